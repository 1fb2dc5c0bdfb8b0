"""The package's layout: old import paths, the code map, the one builder and the one loader."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import ROOT

PKG = ROOT / "src" / "micronet_torch"


OLD_PATHS = [
    ("model", "MicroNet", "micronet_torch.models.micronet"),
    ("weights", "load_pretrained", "micronet_torch.checkpoints.pretrained"),
    ("weights", "read_state_dict", "micronet_torch.checkpoints.state_dict"),
    ("export", "export_onnx", "micronet_torch.runtime.onnx"),
    ("export", "ort_session", "micronet_torch.runtime.ort"),
    ("engine", "TrainConfig", "micronet_torch.train.config"),
    ("engine", "Trainer", "micronet_torch.train.trainer"),
]

# one fresh interpreter imports every old module: first with DeprecationWarning as an error (the warning fires
# at import, and a module whose import raised is not kept), then quietly, and names each symbol's home
OLD_PATHS_PROBE = """
import importlib, json, sys, warnings
result = {}
for old, names in json.loads(sys.argv[1]).items():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            importlib.import_module("micronet_torch." + old)
            warned = ""
        except DeprecationWarning as w:
            warned = str(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = importlib.import_module("micronet_torch." + old)
    for name in names:
        result[old + "." + name] = [warned, getattr(module, name).__module__]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def old_paths() -> dict[str, list[str]]:
    """For each old ``module.name``: the DeprecationWarning its first import gave, and the name's home now."""
    names: dict[str, list[str]] = {}
    for old, name, _ in OLD_PATHS:
        names.setdefault(old, []).append(name)
    probe = [sys.executable, "-c", OLD_PATHS_PROBE, json.dumps(names)]
    proc = subprocess.run(probe, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


@pytest.mark.parametrize(("old", "name", "new_home"), OLD_PATHS)
def test_old_import_paths_still_work_with_a_warning(old_paths, old: str, name: str, new_home: str) -> None:
    warned, home = old_paths[f"{old}.{name}"]
    assert warned and home == new_home


def test_fused_ops_is_public_without_a_warning() -> None:
    code = "import warnings; warnings.simplefilter('error'); from micronet_torch.fused_ops import register; print(1)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "1"


def test_moved_modules_say_where_they_went() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"moved to micronet_torch\.models\.registry"):
        import micronet_torch.registry
    with pytest.raises(ModuleNotFoundError, match=r"moved to micronet_torch\.tools\.bench"):
        import micronet_torch.bench  # noqa: F401


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md matches the tree: every subpackage and module of the package is named in it."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        if rel.stem not in doc:
            missing.append(str(rel))
    for sub in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if f"{sub.name}/" not in doc:
            missing.append(sub.name + "/")
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_one_builder_and_one_loader() -> None:
    """Only models.registry builds a model from a name and only checkpoints.loader loads a model from a file."""
    pattern = re.compile(r"^def (build_model|create_model|load_model|load_for_inference)\(", re.M)
    found = sorted(
        f"{p.relative_to(PKG)}:{m.group(1)}" for p in PKG.rglob("*.py") for m in pattern.finditer(p.read_text())
    )
    assert found == ["checkpoints/loader.py:load_model", "models/registry.py:create_model"]


def test_import_graph_has_no_cycles_or_oversize_modules() -> None:
    tool = ROOT.parent / "shared" / "tools" / "import_graph.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not beside the repository")
    proc = subprocess.run([sys.executable, str(tool), str(ROOT / "src")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert " 0 cycle(s)" in proc.stdout and " 0 file(s) over" in proc.stdout
