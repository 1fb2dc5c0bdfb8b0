"""The micronet::shift_max ExecuTorch kernel (``micronet export --format executorch --fused-ops``): the program
matches the eager model with every Dynamic Shift-Max's fusion and max as one kernel call between XNNPACK
partitions (its hyper-function inside them), loads the kernel by itself, and the kernel refuses an index
that would read past its input instead of reading it."""

from __future__ import annotations

import pytest
import torch
from helpers import SHARED_FIXTURES, runtime_library_or_skip

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy import convert_to_deploy
from micronet_torch.deploy.fused import FusedOpsUnavailable
from micronet_torch.deploy.fused.op import shift_max
from micronet_torch.ops.shift_max import DynamicShiftMax
from micronet_torch.runtime import executorch as et
from micronet_torch.runtime import executorch_ops, load_exported
from micronet_torch.tools.bench import trained_like
from micronet_torch.tools.bench_runtimes import RuntimeRecord, parse_runtimes, ratio_lines

pytestmark = pytest.mark.runtime  # native runtime libraries: run in a child process (tests/isolation.py)

TOL = 2e-5


@pytest.fixture(scope="module")
def library() -> str:
    return runtime_library_or_skip("executorch", executorch_ops.load_kernels)


def _rel(out, ref: torch.Tensor) -> float:
    return float((torch.as_tensor(out) - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", ["micronet_m3"])  # M0: test_published_fixture_through_the_kernel
def test_parity_and_one_kernel_call_per_dsm(name: str, library: str, tmp_path) -> None:
    model = trained_like(micronet_torch.create_model(name))
    graph = convert_to_deploy(model, backend="portable", fused_ops=True)
    path, report = et.write_executorch(graph, tmp_path / name, (1, 3, 64, 64))
    assert executorch_ops.uses_kernels(path)
    assert report.outside.count("micronet.shift_max.default") == sum(
        isinstance(m, DynamicShiftMax) for m in model.modules()
    )
    assert report.shift_max_outside == []  # the hyper-functions run inside XNNPACK
    assert all(op == "micronet.shift_max.default" or "dim_order" in op for op in report.outside)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        assert _rel(graph(x), ref) <= TOL
    assert _rel(load_exported(path, "executorch")(x), ref) <= TOL


def test_published_fixture_through_the_kernel_from_the_cli(library: str, tmp_path, capsys) -> None:
    """``micronet export -c`` of the published-format M0 checkpoint with ``--fused-ops``: the program gives the
    reference logits with one kernel call per Dynamic Shift-Max and no part of one outside XNNPACK, and the
    command prints how to load the kernel library."""
    ckpt = SHARED_FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
    if not ckpt.is_file():
        pytest.skip("fixtures not available")
    ref = torch.load(SHARED_FIXTURES / "official" / "micronet-m0-official-io.pt", weights_only=True)
    out = tmp_path / "m0.pte"
    args = ["export", "--model", "micronet_m0", "-c", str(ckpt), "--format", "executorch", "--fused-ops", "-o"]
    assert main([*args, str(out)]) == 0
    text = capsys.readouterr().out
    n_dsm = sum(isinstance(m, DynamicShiftMax) for m in micronet_torch.create_model("micronet_m0").modules())
    assert "ctypes.CDLL(" in text and f"{n_dsm} x micronet.shift_max.default" in text and "OK" in text, text
    run = load_exported(out, "executorch")
    for i in range(ref["input"].shape[0]):  # the program has a fixed batch of 1
        assert _rel(run(ref["input"][i : i + 1]), ref["logits"][i : i + 1]) <= TOL
    plain, _ = et.write_executorch(torch.nn.Conv2d(3, 4, 1).eval(), tmp_path / "plain", (1, 3, 8, 8))
    assert not executorch_ops.uses_kernels(plain)


class _OneShiftMax(torch.nn.Module):
    def __init__(self, index: list[int]) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return shift_max(x, coef, self.index, 1, 1)


def _program(tmp_path, name: str, index: list[int]):
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.runtime import Runtime

    executorch_ops.register_out_variant()
    x, coef = torch.arange(32.0).reshape(1, 2, 4, 4), torch.tensor([[2.0, -1.0]])
    program = torch.export.export(_OneShiftMax([1, 0]), (x, coef))  # a valid index to trace, then the crafted one
    for node in program.graph.nodes:
        if node.op == "call_function" and "shift_max" in str(node.target):
            node.args = (*node.args[:2], index, *node.args[3:])
    edge = to_edge(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    path = tmp_path / f"{name}.pte"
    path.write_bytes(edge.to_executorch().buffer)
    return Runtime.get().load_program(path).load_method("forward"), x, coef


def test_kernel_refuses_index_past_its_input(library: str, tmp_path) -> None:
    """A crafted program whose index reads past x's channels gets an error from the kernel, never a read."""
    method, x, coef = _program(tmp_path, "ok", [1, 0])
    y = method.execute([x, coef])[0]
    torch.testing.assert_close(y, torch.stack([2.0 * x[0, 1], -1.0 * x[0, 0]])[None], rtol=0, atol=0)
    method, x, coef = _program(tmp_path, "bad", [1, 7])
    with pytest.raises(RuntimeError, match="0x12"):  # ExecuTorch's InvalidArgument, from the kernel's check
        method.execute([x, coef])


def test_missing_compiler_is_one_line(tmp_path) -> None:
    with pytest.raises(FusedOpsUnavailable) as err:
        executorch_ops.library_path(directory=tmp_path, compiler=str(tmp_path / "no-such-c++"))
    assert "\n" not in str(err.value)


def test_bench_runtimes_with_the_kernel() -> None:
    assert parse_runtimes("executorch,executorch-ops") == ("executorch", "executorch-ops")

    def rec(runtime: str, model: str, ms: float) -> RuntimeRecord:
        return RuntimeRecord(runtime, model, ms, ms, ms, 10, 1e-6, 1.0)

    records = [rec("executorch-ops", "micronet_m0", 0.7), rec("executorch-ops", "mobilenetv3_small_050", 1.0)]
    assert (
        "executorch-ops: micronet_m0" in ratio_lines(records, show_targets=True)[0]
        and "target <= 0.75x: met" in ratio_lines(records, show_targets=True)[0]
    )
