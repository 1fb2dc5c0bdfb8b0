"""Exports are transactions: all files renamed into place together with their metadata, never over a file another
format (or anything but an export) wrote, nothing partial after a kill or a failed write, one line per error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micronet_torch.cli import main
from micronet_torch.runtime import TARGETS
from micronet_torch.runtime.files import STAGING_PREFIX
from micronet_torch.runtime.metadata import read_onnx_metadata

SRC = Path(__file__).resolve().parents[1] / "src"
EXPORT = ["export", "--model", "micronet_m0", "--num-classes", "3", "--img-size", "16"]


def _export(out: Path, *extra: str) -> int:
    """``micronet export`` in this process. ONNX files come from the legacy exporter (a fifth of the dynamo
    exporter's time): these tests are about the files around an export, not the exporter."""
    return main([*EXPORT, "-o", str(out), *extra, *(["--exporter", "legacy"] if "--format" not in extra else [])])


def _child(args: list[str], limit: int | None = None) -> subprocess.Popen:
    """``micronet`` in a child process (optionally under a file-size limit, as a full disk would stop it)."""
    code = "import resource, sys\n"
    if limit:
        code += f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
    code += "from micronet_torch.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sidecars_and_weights_have_distinct_names_per_format(tmp_path: Path) -> None:
    """OpenVINO's m0.bin, ncnn's weights and the JSON sidecars of ExecuTorch / LiteRT / ncnn never share a name."""
    names = {fmt: [p.name for p in TARGETS[fmt].files(tmp_path / "m0")] for fmt in TARGETS}
    assert names["openvino"] == ["m0.bin", "m0.xml"]
    assert names["ncnn"] == ["m0.ncnn.bin", "m0.param.json", "m0.param"]
    assert names["executorch"] == ["m0.pte.json", "m0.pte"] and names["tflite"] == ["m0.tflite.json", "m0.tflite"]
    # tflm is the int8 form of the tflite file: the same names (its metadata says which), plus the C++ pair
    assert names["tflm"] == ["m0_model_data.h", "m0_model_data.cc", "m0.tflite.json", "m0.tflite"]
    names.pop("tflm")
    every = [n for files in names.values() for n in files if n != "m0"]  # onnx/torchscript keep the name given
    assert len(every) == len(set(every))
    assert next(p.name for p in TARGETS["ncnn"].files(tmp_path / "m0.ncnn.param")) == "m0.ncnn.bin"


def test_refuses_a_file_it_did_not_write(tmp_path: Path, capsys) -> None:
    """A file in the way that no export of this format wrote is refused before any work (unless --overwrite);
    a file the same format wrote is replaced, metadata and all."""
    out = tmp_path / "m0.onnx"
    out.write_bytes(b"my notes")
    assert _export(out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by micronet export --format onnx" in err and "--overwrite" in err
    assert out.read_bytes() == b"my notes"
    ts = tmp_path / "m0.ts"
    assert _export(ts, "--format", "torchscript") == 0
    assert _export(ts.with_suffix(".onnx"), "--overwrite") == 0  # the notes, replaced on request
    assert read_onnx_metadata(out)["export_format"] == "onnx"
    assert _export(out) == 0  # its own earlier export: replaced without a word
    capsys.readouterr()
    assert main([*EXPORT, "--format", "onnx", "-o", str(ts)]) == 2  # a TorchScript file is not ONNX's to replace
    assert "was not written by micronet export --format onnx" in capsys.readouterr().err
    assert not list(tmp_path.glob(STAGING_PREFIX + "*")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "m0.onnx",
        "m0.ts",
    ]


@pytest.mark.subprocess
def test_killed_export_leaves_the_previous_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of a re-export: the earlier file stays byte for byte; the next export tidies up."""
    out = tmp_path / "m0.onnx"
    assert _export(out) == 0
    before = out.read_bytes()
    child = _child([*EXPORT, "--img-size", "24", "-o", str(out)])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        staged = [p for stage in tmp_path.glob(STAGING_PREFIX + "*") for p in stage.iterdir()]
        if staged:  # the new file is being written or checked
            break
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert out.read_bytes() == before and read_onnx_metadata(out)["export_format"] == "onnx"
    assert list(tmp_path.glob(STAGING_PREFIX + "*"))  # left by the killed process ...
    assert _export(tmp_path / "other.onnx") == 0
    assert not list(tmp_path.glob(STAGING_PREFIX + "*"))  # ... and removed by the next export in that folder


@pytest.mark.subprocess
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A file-size limit (as a full disk) during the write: one line, exit 2, the earlier file and nothing else."""
    out = tmp_path / "m0.onnx"
    out_small = tmp_path / "keep.onnx"
    assert _export(out_small) == 0
    child = _child([*EXPORT, "--num-classes", "1000", "--exporter", "dynamo", "-o", str(out)], limit=600_000)
    _, err = child.communicate(timeout=600)
    assert child.returncode == 2, err[-2000:]
    assert err.count("\n") == 1 and f"cannot write {out}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_bad_output_paths_are_one_line(tmp_path: Path, capsys) -> None:
    """A parent that is a file, a name longer than the file system takes, a read-only folder: one line, exit 2."""
    parent = tmp_path / "notes.txt"
    parent.write_text("x")
    assert _export(parent / "m0.onnx") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _export(tmp_path / ("m" * 300 + ".onnx")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a shorter name" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert _export(ro / "m0.onnx") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot create files in {ro}" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ro") == ["notes.txt"]


def test_export_cli_has_no_format_branches_and_no_top_level_torch() -> None:
    """The export library branches on no format name; the CLI modules import torch only when a command runs."""
    text = (SRC / "micronet_torch" / "runtime" / "export.py").read_text()
    for needle in ("if fmt ==", "format ==", '== "executorch"', '== "openvino"', "options.format =="):
        assert needle not in text
    for name in ("eval", "predict", "export"):
        head = (SRC / "micronet_torch" / "cli" / f"{name}.py").read_text().split("\ndef ")[0]
        assert "import torch" not in head and "from ..runtime" not in head and "from ..tools" not in head
    from micronet_torch.cli import export as cli_export
    from micronet_torch.runtime import DEFAULT_OPSET, INT8_FORMATS

    assert cli_export.DEFAULT_OPSET == DEFAULT_OPSET and cli_export.INT8_FORMATS == INT8_FORMATS
