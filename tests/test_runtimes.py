"""Every deployment export target (``runtime.targets.TARGETS``: openvino, executorch, tflite, ncnn) run in its own
runtime: parity with the eager model, the fixtures, the ExecuTorch program's delegate coverage, metadata, and the
``micronet export --format`` command end to end. A runtime whose package is not installed is skipped with the
reason (``pip install micronet-torch[<extra>]``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import SHARED_FIXTURES

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy import RUNTIME_OPTIONS, convert_to_deploy
from micronet_torch.models import LoadedModel, published_data_config
from micronet_torch.runtime import TARGETS, ExportError, ExportOptions, export_metadata, export_model, load_exported
from micronet_torch.runtime import executorch as et
from micronet_torch.tools.bench import trained_like

pytestmark = pytest.mark.runtime  # native runtime libraries: run in a child process (tests/isolation.py)

TOL = 2e-5
RUNTIME_FORMATS = ("openvino", "executorch", "tflite", "ncnn")
FIXTURES = SHARED_FIXTURES / "official"


def _target(fmt: str):
    target = TARGETS[fmt]
    why = target.missing()
    if why:
        pytest.skip(why)
    return target


def _rel(out, ref: torch.Tensor) -> float:
    return float(abs(torch.as_tensor(out) - ref).max() / ref.abs().max())


# M0 in ExecuTorch: test_executorch_dsm_inside_delegate, which checks its parity too
PARITY_CASES = [
    (n, f) for n in ("micronet_m0", "micronet_m3") for f in RUNTIME_FORMATS if (n, f) != ("micronet_m0", "executorch")
]


@pytest.mark.parametrize(("name", "fmt"), PARITY_CASES)
def test_parity(fmt: str, name: str, tmp_path) -> None:
    """The file ``micronet export --format`` writes (portable form, the runtime's options) matches eager."""
    target = _target(fmt)
    assert target.backend == "portable" and target.options == RUNTIME_OPTIONS[{"tflite": "litert"}.get(fmt, fmt)]
    model = trained_like(micronet_torch.create_model(name))
    res = export_model(model, tmp_path / name, (1, 3, 64, 64), ExportOptions(format=fmt), {"model": name})
    assert res.path.suffix == target.suffix and not res.failures, res.failures
    x = torch.randn(2, 3, 64, 64)  # fixed batch-1 files run image by image
    with torch.no_grad():
        ref = model(x)
    assert _rel(load_exported(res.path, fmt)(x), ref) <= TOL


@pytest.mark.parametrize("fmt", RUNTIME_FORMATS)
def test_published_checkpoint_through_every_target(fmt: str, tmp_path, capsys) -> None:
    """A published-format checkpoint (the M2 fixture, as a user would pass theirs: ``micronet export -c``) gives
    the published code's logits from every target's file."""
    target = _target(fmt)
    ckpt = FIXTURES / "micronet-m2-official-random.pth.tar"
    if not ckpt.is_file():
        pytest.skip("fixtures not available")
    ref = torch.load(FIXTURES / "micronet-m2-official-io.pt", weights_only=True)
    out = tmp_path / f"m2{target.suffix}"
    args = ["export", "--model", "micronet_m2", "-c", str(ckpt), "--format", fmt, "-o", str(out)]
    assert main(args) == 0 and "OK" in capsys.readouterr().out
    assert _rel(load_exported(out, fmt)(ref["input"]), ref["logits"]) <= TOL


def test_executorch_dsm_inside_delegate(tmp_path) -> None:
    """Every Dynamic Shift-Max of M0 runs inside the one XNNPACK partition (only layout copies stay outside), and
    the program matches eager."""
    _target("executorch")
    model = trained_like(micronet_torch.create_model("micronet_m0"))
    portable = convert_to_deploy(model, backend="portable", **RUNTIME_OPTIONS["executorch"])
    path, report = et.write_executorch(portable, tmp_path / "m0", (1, 3, 64, 64), {"mean": "[0.5, 0.5, 0.5]"})
    assert report.shift_max_outside == []
    assert report.partitions == 1
    assert all(any(c in op for c in et.LAYOUT_COPIES) for op in report.outside), report.outside
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert _rel(load_exported(path, "executorch")(x), ref) <= TOL


def test_missing_runtime_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(TARGETS, "ncnn", dataclasses.replace(TARGETS["ncnn"], packages=("no_such_module_13",)))
    with pytest.raises(ExportError, match=r"pip install micronet-torch\[ncnn\]"):
        ExportOptions(format="ncnn").validate()
    with pytest.raises(ExportError, match="openvino"):
        ExportOptions(format="onnx", dynamic_batch=True).validate()


def test_export_metadata() -> None:
    model = micronet_torch.create_model("micronet_m0", num_classes=3).eval()
    meta = export_metadata(LoadedModel(model, "micronet_m0", published_data_config(96), ["a", "b", "c"], "name"))
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["input_size"]) == [3, 96, 96] and json.loads(meta["class_names"]) == ["a", "b", "c"]
    assert meta["input_name"] == "input" and meta["micronet_torch_version"] == micronet_torch.__version__
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])


def test_cli_export_openvino(tmp_path, capsys) -> None:
    """``micronet export --format openvino``: the IR, its metadata in rt_info, and the printed parity check."""
    _target("openvino")
    out = tmp_path / "m0.xml"
    assert main(["export", "--model", "micronet_m0", "--img-size", "32", "--format", "openvino", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "image by image" in text and "OK" in text
    import openvino  # optional runtime, present here (skipped above otherwise)

    ov_model = openvino.Core().read_model(str(out))
    assert ov_model.get_rt_info(["micronet", "model"]).astype(str) == "micronet_m0"
    assert json.loads(ov_model.get_rt_info(["micronet", "input_size"]).astype(str)) == [3, 32, 32]


def test_ncnn_converter_log_is_captured_and_quoted(tmp_path, monkeypatch, capfd) -> None:
    """pnnx logs its passes below Python: a good export prints none of it, a failed one quotes its last lines."""
    _target("ncnn")
    import pnnx

    from micronet_torch.runtime import ConversionError
    from micronet_torch.runtime.ncnn import export_ncnn

    model = micronet_torch.create_model("micronet_m0", num_classes=10).eval()
    export_ncnn(model, tmp_path / "m0.param", (1, 3, 32, 32))
    out, err = capfd.readouterr()
    assert (tmp_path / "m0.ncnn.bin").is_file() and "pass_level" not in out + err

    def fails(*args, **kwargs):  # what a pnnx that rejects the graph does: logs, writes nothing, returns
        import os

        os.write(2, b"############# pass_level2\nunsupported op aten::frob\n")

    monkeypatch.setattr(pnnx, "export", fails)
    with pytest.raises(ConversionError, match=r"pnnx wrote no ncnn model; its log ends: .*unsupported op aten::frob"):
        export_ncnn(model, tmp_path / "bad.param", (1, 3, 32, 32))
    assert not (tmp_path / "bad.param").exists() and "frob" not in "".join(capfd.readouterr())

    def raises(*args, **kwargs):
        import os

        os.write(2, b"tracing the graph\n")
        raise RuntimeError("aten::frob is not supported")

    monkeypatch.setattr(pnnx, "export", raises)
    match = r"pnnx could not convert the model \(aten::frob is not supported\); its log ends: tracing the graph"
    with pytest.raises(ConversionError, match=match):
        export_ncnn(model, tmp_path / "bad.param", (1, 3, 32, 32))


def test_litert_converter_log_is_captured_and_quoted(tmp_path, monkeypatch, capfd) -> None:
    """litert_torch's progress log and TensorFlow's start-up lines stay off the terminal; a failure is one error."""
    _target("tflite")
    import litert_torch

    from micronet_torch.runtime import ConversionError
    from micronet_torch.runtime.litert import export_litert, load_litert

    # what the converter logs does not depend on the network: a two-layer one converts in a fraction of M0's time
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10)
    )
    path = export_litert(model.eval(), tmp_path / "m0.tflite", (1, 3, 32, 32))
    assert load_litert(path)(torch.zeros(1, 3, 32, 32).numpy()).shape == (1, 10)
    out, err = capfd.readouterr()
    assert "LiteRT-Torch Convert" not in out + err and "XNNPACK delegate" not in out + err

    def fails(*args, **kwargs):
        print("(00:00) [START] LiteRT-Torch Convert", flush=True)
        raise RuntimeError("failed to legalize operation 'tfl.frob'")

    monkeypatch.setattr(litert_torch, "convert", fails)
    with pytest.raises(ConversionError, match=r"litert_torch could not convert the model \(failed to legalize"):
        export_litert(model, tmp_path / "bad.tflite", (1, 3, 32, 32))
