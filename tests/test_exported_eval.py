"""eval / predict of exported files: a file whose graph and metadata disagree, a graph that is no image classifier,
bad metadata or an input size past the limit is one line naming the file (exit 2), before any image is read;
evaluation batches are bounded in pixels; int8 calibration takes grey and RGBA images side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from micronet_torch.cli import main
from micronet_torch.data.config import MAX_BATCH_PIXELS, MAX_IMG_SIZE
from micronet_torch.tools.evaluate import pixel_batch


def _config(img_size: int = 8, in_chans: int = 3) -> str:
    return json.dumps({"img_size": img_size, "in_chans": in_chans, "policy": "small"})


def _onnx(path: Path, inp: list, out: list, nodes: list, meta: dict[str, str] | None = None) -> Path:
    """A small ONNX graph with one input ``x`` and one output ``y`` (and ``meta`` as its metadata_props)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def _classifier(path: Path, chans: int, size: int | str, meta: dict[str, str] | None = None) -> Path:
    """Global average pool then flatten: (N, C, H, W) -> (N, C) logits."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    return _onnx(path, ["N", chans, size, size], ["N", chans], nodes, meta)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)
    return path


def _predict_error(capsys, model: Path, image: Path) -> str:
    assert main(["predict", "-c", str(model), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_graph_and_metadata_must_agree(tmp_path: Path, image: Path, capsys) -> None:
    good = _classifier(tmp_path / "good.onnx", 3, 8, {"data_config": _config(), "class_names": '["a", "b", "c"]'})
    assert main(["predict", "-c", str(good), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in ("a", "b", "c")
    grey = _classifier(tmp_path / "grey.onnx", 1, 8, {"data_config": _config(8, 3)})  # says 3 channels, takes 1
    err = _predict_error(capsys, grey, image)
    assert str(grey) in err and "does not take the 3x8x8 input its metadata declares" in err
    names = _classifier(tmp_path / "names.onnx", 3, 8, {"data_config": _config(), "class_names": '["a"]'})
    assert "names 1 classes but the graph outputs 3" in _predict_error(capsys, names, image)
    bad = _classifier(tmp_path / "bad.onnx", 3, 8, {"data_config": "{not json"})
    err = _predict_error(capsys, bad, image)
    assert str(bad) in err and "data_config is not valid" in err


def test_graphs_that_are_not_image_classifiers(tmp_path: Path, image: Path, capsys) -> None:
    flat = _onnx(tmp_path / "flat.onnx", ["N", 10], ["N", 10], [helper.make_node("Relu", ["x"], ["y"])])
    assert "not an image batch (N, C, H, W)" in _predict_error(capsys, flat, image)
    meta = {"data_config": _config()}
    rank4 = _onnx(
        tmp_path / "rank4.onnx", ["N", 3, 8, 8], ["N", 3, 8, 8], [helper.make_node("Relu", ["x"], ["y"])], meta
    )
    assert "not (1, classes) logits" in _predict_error(capsys, rank4, image)


def test_input_sizes_are_bounded(tmp_path: Path, image: Path, capsys) -> None:
    """A graph declaring 100,000 px, metadata saying 4096 px on a dynamic graph, --img-size past the limit."""
    huge = _classifier(tmp_path / "huge.onnx", 3, 100_000)
    assert f"the largest input size is {MAX_IMG_SIZE}" in _predict_error(capsys, huge, image)
    dynamic = _classifier(tmp_path / "dynamic.onnx", 3, "S", {"data_config": _config(4096)})
    assert "img_size=4096 is not valid" in _predict_error(capsys, dynamic, image)
    plain = _classifier(tmp_path / "plain.onnx", 3, "S", {"data_config": _config(8)})
    assert main(["eval", "-c", str(plain), "--img-size", "4096", "--data", str(tmp_path)]) == 2
    assert f"must be 1 to {MAX_IMG_SIZE} px" in capsys.readouterr().err
    assert pixel_batch(1000, 224) == MAX_BATCH_PIXELS // 224**2 == 334 and pixel_batch(256, MAX_IMG_SIZE) == 4
    assert pixel_batch(256, 32) == 256


def test_predict_on_a_folder_says_so(tmp_path: Path, image: Path, capsys) -> None:
    err = _predict_error(capsys, tmp_path, image)
    assert f"checkpoint {tmp_path} is a folder" in err and "does not exist" not in err


def test_int8_calibration_mixes_grey_and_rgba(tmp_path: Path, capsys) -> None:
    """Grey, RGBA and an unreadable file in one calibration folder: converted like training does, the bad one
    skipped and named, no stray fp32 file; with no readable image, the export stops before its work."""
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8), mode="L").save(calib / f"g{i}.png")
        Image.fromarray(rng.integers(0, 256, (14, 14, 4), np.uint8), mode="RGBA").save(calib / f"c{i}.png")
    (calib / "zz_bad.png").write_bytes(b"not a png")
    out = tmp_path / "out" / "q.onnx"
    args = ["export", "--model", "micronet_m0", "--num-classes", "3", "--img-size", "16", "--exporter", "legacy"]
    args += ["--int8", "--calib"]  # (legacy: a fifth of the dynamo exporter's time; this is about calibration)
    rc = main([*args, str(calib), "--skip-bad-images", "--keep-failed", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc in (0, 1) and "zz_bad.png" in text and "8 images of" in text
    assert sorted(p.name for p in out.parent.iterdir()) == (["q.onnx"] if rc == 0 else ["q-FAILED.onnx"])
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"nope")
    assert main([*args, str(only_bad), "--skip-bad-images", "-o", str(tmp_path / "none" / "q.onnx")]) == 2
    captured = capsys.readouterr()
    assert "no readable image" in captured.err and "parity" not in captured.out
    assert not (tmp_path / "none").exists()
