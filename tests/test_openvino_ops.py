"""The micronet.ShiftMax OpenVINO extension (``micronet export --format openvino --fused-ops``): the IR matches the
eager model with every Dynamic Shift-Max as one extension operation, loads only with the extension, refuses an
operation that would read past its input, and ``bench --runtimes openvino-ops`` judges it by the fused target."""

from __future__ import annotations

import pytest
import torch
from helpers import SHARED_FIXTURES, runtime_library_or_skip

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy.fused import FusedOpsUnavailable
from micronet_torch.ops.shift_max import DynamicShiftMax
from micronet_torch.runtime import ExportError, ExportOptions, export_model, load_exported, openvino_ops
from micronet_torch.tools.bench import trained_like
from micronet_torch.tools.bench_runtimes import RuntimeRecord, parse_runtimes, ratio_lines

pytestmark = pytest.mark.runtime  # native runtime libraries: run in a child process (tests/isolation.py)

TOL = 2e-5


@pytest.fixture(scope="module")
def library() -> str:
    return runtime_library_or_skip("openvino", openvino_ops.library_path)


def _ops(xml, library: str) -> list[str]:
    import openvino  # optional runtime, present here (the fixture skipped otherwise)

    core = openvino.Core()
    core.add_extension(library)
    return [op.get_type_name() for op in core.read_model(str(xml)).get_ops()]


@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m3"])
def test_parity_and_one_operation_per_dsm(name: str, library: str, tmp_path) -> None:
    model = trained_like(micronet_torch.create_model(name))
    options = ExportOptions(format="openvino", fused_ops=True)
    res = export_model(model, tmp_path / name, (1, 3, 64, 64), options, {"model": name})
    assert openvino_ops.uses_extension(res.path)
    ops = _ops(res.path, library)
    assert ops.count("ShiftMax") == sum(isinstance(m, DynamicShiftMax) for m in model.modules())
    assert not any(t in ops for t in ("ReduceMax", "Maximum"))  # the max over the K fusions is in the op
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    out = torch.as_tensor(load_exported(res.path, "openvino")(x))
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL


def test_published_fixture_through_the_extension(library: str, tmp_path) -> None:
    """The published-format M0 checkpoint's reference logits, through the fused IR."""
    ckpt = SHARED_FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
    if not ckpt.is_file():
        pytest.skip("fixtures not available")
    ref = torch.load(SHARED_FIXTURES / "official" / "micronet-m0-official-io.pt", weights_only=True)
    model = micronet_torch.create_model("micronet_m0", pretrained=str(ckpt)).eval()
    shape = (1, *ref["input"].shape[1:])
    res = export_model(model, tmp_path / "m0", shape, ExportOptions(format="openvino", fused_ops=True))
    out = torch.as_tensor(load_exported(res.path, "openvino")(ref["input"]))
    assert float((out - ref["logits"]).abs().max() / ref["logits"].abs().max()) <= TOL


def test_ir_needs_the_extension(library: str, tmp_path) -> None:
    import openvino

    model = micronet_torch.create_model("micronet_m0").eval()
    res = export_model(model, tmp_path / "m0", (1, 3, 32, 32), ExportOptions(format="openvino", fused_ops=True))
    with pytest.raises(RuntimeError, match="ShiftMax"):
        openvino.Core().read_model(str(res.path))  # no extension: OpenVINO names the operation it lacks
    plain = export_model(model, tmp_path / "plain", (1, 3, 32, 32), ExportOptions(format="openvino"))
    assert not openvino_ops.uses_extension(plain.path)


def _onnx_shift_max(path, channels: int, index: list[int]) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ShiftMax", ["x", "coef"], ["y"], domain="micronet", index=index, k=1, j=1)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4]),
            helper.make_tensor_value_info("coef", TensorProto.FLOAT, [1, len(index)]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(index), 4, 4])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("micronet", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def test_operation_refuses_index_past_its_input(library: str, tmp_path) -> None:
    """A crafted graph whose index reads past x's channels is refused when it is read, never run."""
    import numpy as np
    import openvino

    _onnx_shift_max(tmp_path / "ok.onnx", 2, [1, 0])
    ov_model = openvino.convert_model(str(tmp_path / "ok.onnx"), extension=library)
    core = openvino.Core()
    core.add_extension(library)
    x, coef = np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4), np.array([[2.0, -1.0]], dtype=np.float32)
    y = core.compile_model(ov_model, "CPU").create_infer_request().infer([x, coef])[0]
    np.testing.assert_array_equal(y, np.stack([2.0 * x[0, 1], -1.0 * x[0, 0]])[None])
    _onnx_shift_max(tmp_path / "bad.onnx", 2, [1, 7])
    with pytest.raises(Exception, match="index reads past"):
        openvino.convert_model(str(tmp_path / "bad.onnx"), extension=library)


def test_missing_compiler_is_one_line(tmp_path) -> None:
    with pytest.raises(FusedOpsUnavailable) as err:
        openvino_ops.library_path(directory=tmp_path, compiler=str(tmp_path / "no-such-c++"))
    assert "\n" not in str(err.value)


def test_cli_export_and_refusals(library: str, tmp_path, capsys) -> None:
    out = tmp_path / "m0.xml"
    args = ["export", "--model", "micronet_m0", "--img-size", "32", "--format", "openvino", "--fused-ops", "-o"]
    assert main([*args, str(out)]) == 0
    text = capsys.readouterr().out
    assert "core.add_extension(" in text and "OK" in text
    with pytest.raises(ExportError, match="--format tflite"):
        ExportOptions(format="tflite", fused_ops=True).validate()
    refused = ["export", "--model", "micronet_m0", "--format", "tflite", "--fused-ops", "-o", str(tmp_path / "x")]
    assert main(refused) == 2
    assert "--fused-ops" in capsys.readouterr().err


def test_bench_runtimes_with_ops() -> None:
    assert parse_runtimes("openvino,openvino-ops,ort-ops") == ("openvino", "openvino-ops", "ort-ops")
    with pytest.raises(ValueError, match="openvino-ops"):
        parse_runtimes("openvino-opz")

    def rec(runtime: str, model: str, ms: float) -> RuntimeRecord:
        return RuntimeRecord(runtime, model, ms, ms, ms, 10, 1e-6, 1.0)

    records = [rec(rt, "micronet_m0", 0.8) for rt in ("openvino", "openvino-ops")]
    records += [rec(rt, "mobilenetv3_small_050", 1.0) for rt in ("openvino", "openvino-ops")]
    lines = ratio_lines(records, show_targets=True)
    assert "openvino: micronet_m0" in lines[0] and "target <= 0.85x: met" in lines[0]
    assert "openvino-ops: micronet_m0" in lines[1] and "target <= 0.75x: NOT met" in lines[1]
