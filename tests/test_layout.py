"""The package's layout: old import paths, the code map, the one builder and the one loader."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT

PKG = ROOT / "src" / "micronet_torch"


@pytest.mark.parametrize(
    ("old", "name", "new_home"),
    [
        ("model", "MicroNet", "micronet_torch.models.micronet"),
        ("weights", "load_pretrained", "micronet_torch.checkpoints.pretrained"),
        ("weights", "read_state_dict", "micronet_torch.checkpoints.state_dict"),
        ("export", "export_onnx", "micronet_torch.runtime.onnx"),
        ("export", "ort_session", "micronet_torch.runtime.ort"),
        ("engine", "TrainConfig", "micronet_torch.train.config"),
        ("engine", "Trainer", "micronet_torch.train.trainer"),
    ],
)
def test_old_import_paths_still_work_with_a_warning(old: str, name: str, new_home: str) -> None:
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        f"try:\n    import micronet_torch.{old}\nexcept DeprecationWarning as w:\n    print('warned', w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"import micronet_torch.{old} as m\nprint(getattr(m, {name!r}).__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("warned") and out.strip().endswith(new_home)


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
