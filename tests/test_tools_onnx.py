"""Exports carry their metadata, eval / predict run ONNX files, predict per image."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from micronet_torch import __version__
from micronet_torch.cli import main
from micronet_torch.runtime.metadata import read_onnx_metadata

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"
HAS_CC = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A trained tiny run (16 px, so the images need no resize) and its fp32 ONNX export."""
    out = tmp_path_factory.mktemp("onnx") / "run"
    args = ["train", "--data", str(tiny_folder), "--img-size", "16", "--epochs", "2", "--batch-size", "6"]
    assert main([*args, "--workers", "0", "--output", str(out), "--quiet"]) == 0
    assert main(["export", "-c", str(out / "best.pt"), "--output", str(out / "m0.onnx")]) == 0
    return out


def eval_json(capsys: pytest.CaptureFixture, checkpoint: Path, data: Path) -> dict:
    assert main(["eval", "-c", str(checkpoint), "--data", str(data), "--json", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_onnx_metadata(run: Path) -> None:
    meta = read_onnx_metadata(run / "m0.onnx")
    assert json.loads(meta["class_names"]) == ["circle", "cross", "stripes"]
    assert meta["input_name"] == "input" and json.loads(meta["input_size"]) == ["batch", 3, 16, 16]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406]) and len(json.loads(meta["std"])) == 3
    assert meta["model_name"] == "micronet_m0" and meta["micronet_torch_version"] == __version__
    assert json.loads(meta["data_config"])["img_size"] == 16


def test_eval_and_predict_onnx_match_checkpoint(capsys: pytest.CaptureFixture, run: Path, tiny_folder: Path) -> None:
    pt = eval_json(capsys, run / "best.pt", tiny_folder)
    ox = eval_json(capsys, run / "m0.onnx", tiny_folder)
    assert abs(pt["top1"] - ox["top1"]) <= 0.1 and ox["n"] == pt["n"]
    image = str(tiny_folder / "val" / "cross" / "0.png")
    assert main(["predict", "-c", str(run / "m0.onnx"), image, "--json"]) == 0
    onnx_top = json.loads(capsys.readouterr().out)[0]["top"][0]
    assert main(["predict", "-c", str(run / "best.pt"), image, "--json"]) == 0
    pt_top = json.loads(capsys.readouterr().out)[0]["top"][0]
    assert onnx_top["class"] == pt_top["class"] and onnx_top["probability"] == pytest.approx(
        pt_top["probability"], 1e-4
    )


@pytest.mark.skipif(not HAS_CC, reason="the fused operator library needs a C compiler")
def test_eval_fused_onnx(capsys: pytest.CaptureFixture, run: Path, tiny_folder: Path) -> None:
    fused = run / "fused.onnx"
    assert main(["export", "-c", str(run / "best.pt"), "--fused-ops", "--output", str(fused)]) == 0
    capsys.readouterr()
    assert (
        abs(eval_json(capsys, fused, tiny_folder)["top1"] - eval_json(capsys, run / "best.pt", tiny_folder)["top1"])
        <= 0.1
    )


def test_docs_snippet_runs_the_file_alone(
    capsys: pytest.CaptureFixture, run: Path, tiny_folder: Path, monkeypatch
) -> None:
    text = DOCS.read_text()
    code = re.search(r"<!-- snippet: run-onnx[^\n]*\n```python\n(.*?)```", text, re.S).group(1)
    assert "micronet_torch" not in code
    monkeypatch.syspath_prepend(str(DOCS.parents[1] / "src" / "micronet_torch" / "data"))  # preprocess.py
    image = tiny_folder / "val" / "stripes" / "1.png"
    code = code.replace('"m0.onnx"', repr(str(run / "m0.onnx"))).replace('"photo.png"', repr(str(image)))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "deploy.md", "exec"), {})
    assert main(["predict", "-c", str(run / "m0.onnx"), str(image), "--json"]) == 0
    assert buf.getvalue().strip() == json.loads(capsys.readouterr().out)[0]["top"][0]["class"]


def test_not_a_checkpoint_is_named(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert main(["eval", "-c", str(notes), "--data", str(tiny_folder)]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint this package reads" in err and "text file" in err and "Traceback" not in err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    assert main(["predict", "-c", str(bad), str(notes)]) == 2
    assert "ONNX Runtime cannot load it" in capsys.readouterr().err


# ---- predict per image ---------------------------------------------------------------------------
def test_predict_reports_each_bad_image(
    capsys: pytest.CaptureFixture, run: Path, tmp_path: Path, tiny_folder: Path
) -> None:
    folder = tmp_path / "imgs"
    shutil.copytree(tiny_folder / "val" / "circle", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG nope")
    ckpt = str(run / "best.pt")
    rc = main(
        [
            "predict",
            "-c",
            ckpt,
            str(folder),
            str(tmp_path / "missing.png"),
            str(tiny_folder / "val" / "cross" / "*.png"),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2
    assert out.count("circle/") == 0 and out.count(str(folder)) == 4 and out.count("/cross/") == 4  # folder + glob
    assert "broken.png" in err and "missing.png" in err and "does not exist" in err and "Traceback" not in err
    assert main(["predict", "-c", ckpt, str(folder), "--skip-bad-images", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert sum("top" in r for r in results) == 4 and [r["image"] for r in results if "error" in r] == [
        str(folder / "broken.png")
    ]


# ---- int8 calibration ---------------------------------------------------------------------------
def test_int8_calibration_folder_skip_and_failed_check(
    capsys: pytest.CaptureFixture, run: Path, tmp_path: Path, tiny_folder: Path, monkeypatch
) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "cross" / "zz_bad.png").write_bytes(b"\x89PNG nope")
    out = tmp_path / "q.onnx"
    # the legacy ONNX exporter (a fifth of the dynamo exporter's time): this is about calibration and the check
    args = ["export", "-c", str(run / "best.pt"), "--int8", "--calib", str(data), "--output", str(out), "--exporter"]
    args.append("legacy")
    assert main(args) == 2
    assert "zz_bad.png" in capsys.readouterr().err and not out.exists()
    main([*args, "--skip-bad-images"])
    text = capsys.readouterr().out
    assert f"images of {data / 'train'}" in text and "zz_bad.png" in text
    assert read_onnx_metadata(out)["quantization"].startswith("int8") if out.exists() else "FAIL" in text
    out.unlink(missing_ok=True)
    monkeypatch.setattr("micronet_torch.runtime.export.INT8_MIN_AGREEMENT", 1.01)  # a check that cannot pass
    assert main([*args, "--skip-bad-images"]) == 1
    assert not out.exists() and not list(tmp_path.glob("q.unchecked*"))
    assert "not written" in capsys.readouterr().out
    assert main([*args, "--skip-bad-images", "--keep-failed"]) == 1
    assert (tmp_path / "q-FAILED.onnx").is_file() and not out.exists()


# ---- words that match behaviour ---------------------------------------------------------------
def test_help_texts_and_version(capsys: pytest.CaptureFixture) -> None:
    from micronet_torch.cli.main import build_parser

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"micronet-torch {__version__}"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    train_help = " ".join(sub["train"].format_help().split())
    assert "micronet list" not in train_help and "micronet models" in train_help
    assert "img_size/16" in train_help and "0 for folders of small images" in train_help
    assert sub["demo"].description.rstrip().endswith(".")
    assert "-c CHECKPOINT" in sub["export"].format_help() and "--keep-failed" in sub["export"].format_help()


def test_torchscript_export_carries_metadata(run: Path, tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m0.ts"
    assert main(["export", "-c", str(run / "best.pt"), "--format", "torchscript", "--output", str(path)]) == 0
    extra = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(json.loads(extra["metadata.json"])["class_names"]) == ["circle", "cross", "stripes"]
