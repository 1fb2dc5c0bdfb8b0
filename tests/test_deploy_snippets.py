"""Every deploy snippet is a test: docs/deploy.md's lines for each runtime run, as written, in a Python that cannot
import micronet_torch, on exported M0 files and on awkward images; they give ``micronet predict``'s classes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import class_image
from PIL import Image

from micronet_torch.cli import main
from micronet_torch.runtime import TARGETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "deploy.md").read_text()
PREPROCESS = ROOT / "src" / "micronet_torch" / "data" / "preprocess.py"
FILES = {"onnx": "m0.onnx", "openvino": "m0.xml", "executorch": "m0.pte", "tflite": "m0.tflite", "ncnn": "m0.param"}

# runs a snippet once per image with micronet_torch unimportable (-I: no PYTHONPATH, no user site; a finder
# refuses the editable install), then prints the logits it computed
WRAPPER = r"""
import importlib.abc, json, sys
import numpy as np

class NoPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "micronet_torch":
            raise ImportError("micronet_torch cannot be imported here")

sys.meta_path.insert(0, NoPackage())
sys.path.insert(0, ".")
code, images, out = sys.argv[1], json.loads(sys.argv[2]), []
for image in images:
    scope = {"__name__": "__main__"}
    exec(compile(code.replace('"photo.png"', repr(image)), "deploy.md", "exec"), scope)
    out.append(np.asarray(scope["logits"], dtype=np.float64).reshape(-1).tolist())
print("LOGITS " + json.dumps(out))
"""


def snippet(name: str) -> str:
    found = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", DOCS, re.S)
    assert found, f"docs/deploy.md has no snippet {name}"
    return found.group(1)


def test_docs_print_the_preprocessing_file_whole() -> None:
    """The copy users take from the docs is the file the package reads images with, and it needs no torch."""
    block = re.search(r"<!-- file: src/micronet_torch/data/preprocess.py -->\n```python\n(.*?)```", DOCS, re.S)
    assert block and block.group(1) == PREPROCESS.read_text()
    imports = re.findall(r"^(?:from|import) (\S+)", PREPROCESS.read_text(), re.M)
    assert set(imports) == {"__future__", "json", "numpy", "PIL"}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A phone JPEG stored sideways (EXIF orientation 6), a 16-bit PNG, an RGBA PNG and a greyscale PNG."""
    folder = tmp_path_factory.mktemp("snippet-images")
    rng = np.random.default_rng(3)
    stripes = np.kron(class_image(2, rng, 16), np.ones((2, 3), np.uint8))  # 32 x 48: not square
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers (and the package) turn it upright
    Image.fromarray(np.rot90(stripes)).convert("RGB").save(folder / "phone.jpg", exif=exif, quality=95)
    deep = (class_image(0, rng, 24).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    rgba = np.dstack([class_image(1, rng, 28)] * 3 + [rng.integers(0, 256, (28, 28), dtype=np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(class_image(2, rng, 20), mode="L").save(folder / "grey.png")
    return [str(folder / n) for n in ("phone.jpg", "deep.png", "rgba.png", "grey.png")]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("snippet-exports")
    (folder / "preprocess.py").write_text(PREPROCESS.read_text())
    return folder


@pytest.fixture
def exported(fmt: str, export_dir: Path, trained: Path) -> Path:
    """The trained M0 exported to ``fmt`` (once per module), named as the docs name it, preprocess.py beside it."""
    if TARGETS[fmt].missing():
        pytest.skip(TARGETS[fmt].missing())
    path = export_dir / FILES[fmt]
    if not path.exists():
        assert main(["export", "-c", str(trained / "best.pt"), "--format", fmt, "-o", str(path)]) == 0
    return export_dir


@pytest.mark.runtime
@pytest.mark.subprocess
@pytest.mark.parametrize("fmt", list(FILES))
def test_snippet_gives_predicts_classes(fmt: str, exported: Path, images: list[str], capsys) -> None:
    """Slow (each runtime converts once per module, ~10-60 s): the snippet's class is predict's on every image,
    and its probabilities are predict's within 1e-4 (a non-contiguous input or other pixels would not be)."""
    code = snippet(f"run-{fmt}")
    assert "micronet_torch" not in code
    child = subprocess.run(
        [sys.executable, "-I", "-c", WRAPPER, code, json.dumps(images)],
        cwd=exported,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    lines = child.stdout.splitlines()
    printed, logits = lines[:-1], json.loads(lines[-1].removeprefix("LOGITS "))
    capsys.readouterr()
    assert main(["predict", "-c", str(exported / FILES[fmt]), *images, "--json", "-k", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == images
    for result, row, cls in zip(results, logits, printed, strict=True):
        top = result["top"][0]
        assert cls == top["class"]
        row = np.asarray(row)
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert int(probs.argmax()) == top["index"] and probs.max() == pytest.approx(top["probability"], abs=1e-4)


@pytest.mark.runtime
@pytest.mark.parametrize("fmt", [f for f in FILES if f != "onnx"])
def test_eval_reads_each_format(fmt: str, exported: Path, trained: Path, tiny_folder: Path, capsys) -> None:
    """``micronet eval -c m0.xml|.pte|.tflite|.param`` runs the file with its runtime: the checkpoint's numbers."""

    def evaluated(path: Path) -> dict:
        assert main(["eval", "-c", str(path), "--data", str(tiny_folder), "--json", "--workers", "0"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    ref, got = evaluated(trained / "best.pt"), evaluated(exported / FILES[fmt])
    assert got["n"] == ref["n"] and got["top1"] == pytest.approx(ref["top1"], abs=0.1)
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-3)
