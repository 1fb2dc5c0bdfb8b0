"""Floors of ``micronet bench --runtimes --floors``: the no-shift variant computes exactly its share of Dynamic
Shift-Max, the ReLU variant leaves no Dynamic Shift-Max, and the ratio lines say what a floor rules out."""

from __future__ import annotations

import json

import pytest
import torch

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy import convert_to_deploy
from micronet_torch.deploy.modules import FusedShiftMax
from micronet_torch.deploy.portable import PortableShiftMax, TwinConvShiftMax
from micronet_torch.tools.bench import trained_like
from micronet_torch.tools.bench_floors import NoShiftMax, floor_graph
from micronet_torch.tools.bench_runtimes import RuntimeRecord, ratio_lines


def _dsms(graph: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in graph.modules() if isinstance(m, (PortableShiftMax, FusedShiftMax))]


def _no_shift_reference(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """max_k x * a_k0 from the deploy module's own coefficients (a_k0: the coefficient of x itself)."""
    if isinstance(m, PortableShiftMax):
        z = m.fc2(torch.relu(m.fc1(x.mean((2, 3), keepdim=True))))
        coef = (torch.nn.functional.hardsigmoid(z) if m.scaled else z.clamp(m.lo, m.hi)) + m.offset
        parts = [coef[:, kk * m.channels : (kk + 1) * m.channels] for kk in range(m.k)]
        return torch.stack([x * a for a in parts]).amax(0)
    coef = m.coefficients(x).view(len(x), m.out_channels, m.k, m.j, 1, 1)
    xs = x[:, m.x_index]
    return torch.stack([xs * coef[:, :, kk, 0] for kk in range(m.k)]).amax(0)


@pytest.mark.parametrize("backend", ["portable", "onnx"])
@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m3"])
def test_no_shift_is_the_shift_free_part(backend: str, name: str) -> None:
    graph = convert_to_deploy(trained_like(micronet_torch.create_model(name)), backend=backend)
    dsms = _dsms(graph)
    assert dsms
    for m in dsms:
        channels = m.channels if isinstance(m, PortableShiftMax) else m.in_channels
        x = torch.randn(2, channels, 5, 6)
        with torch.no_grad():
            out, ref = NoShiftMax(m)(x), _no_shift_reference(m, x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["relu", "noshift"])
def test_floor_graph_replaces_every_dsm(kind: str) -> None:
    graph = convert_to_deploy(trained_like(micronet_torch.create_model("micronet_m0")), backend="portable")
    floor = floor_graph(graph, kind)
    assert not _dsms(floor) and len(_dsms(graph)) == 15  # the original is left as it was
    assert not any(isinstance(m, TwinConvShiftMax) for m in floor.modules())  # no twin conv left computing a shift
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in graph.modules())
    twins = sum(isinstance(m, TwinConvShiftMax) for m in graph.modules())
    assert twins == 9 and sum(isinstance(m, torch.nn.Conv2d) for m in floor.modules()) == convs - twins - 15 * 2 * (
        kind == "relu"
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert floor(x).shape == graph(x).shape
        assert not torch.allclose(floor(x), graph(x))  # a floor computes something else
    with pytest.raises(ValueError, match="no Dynamic Shift-Max"):
        floor_graph(torch.nn.Sequential(torch.nn.ReLU()), kind)
    with pytest.raises(ValueError, match="unknown floor"):
        floor_graph(graph, "gelu")


def test_ratio_lines_with_floors() -> None:
    def rec(model: str, ms: float) -> RuntimeRecord:
        return RuntimeRecord("openvino", model, ms, ms, ms, 10, None, 1.0)

    base = [rec("mobilenetv3_small_050", 1.0), rec("mobilenetv3_small_100", 2.0)]
    m0 = [rec("micronet_m0", 1.1), rec("micronet_m0+relu", 0.6), rec("micronet_m0+noshift", 0.9)]
    m3 = [rec("micronet_m3", 4.0), rec("micronet_m3+relu", 2.6), rec("micronet_m3+noshift", 3.0)]
    m0_line, m3_line = ratio_lines(base + m0 + m3, show_targets=True)
    assert "out of reach" not in " ".join(ratio_lines(base + m0 + m3))  # the printed tables: ratios, no targets
    assert "1.10x" in m0_line and "ReLU 0.60x" in m0_line and "shift 0.90x" in m0_line
    assert "out of reach of standard operators" in m0_line
    assert "2.00x" in m3_line and "ReLU 1.30x" in m3_line and "out of reach of any Dynamic Shift-Max" in m3_line


def test_cli_floors(capsys) -> None:
    """``micronet bench --runtimes ort --floors --json``: the models asked for and their floors, timed and checked
    (the command without ``--floors`` runs the same path on the models alone)."""
    assert main(["bench", "--floors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runtimes" in err[0]
    args = ["bench", "--runtimes", "ort", "--floors", "--models", "micronet_m0", "mobilenetv3_small_050"]
    assert main([*args, "--img-size", "32", "--runs", "2", "--warmup", "1", "--max-seconds", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    by_model = {r["model"]: r for r in records}
    assert set(by_model) == {"micronet_m0", "micronet_m0+relu", "micronet_m0+noshift", "mobilenetv3_small_050"}
    assert all(r["median_ms"] > 0 for r in records)
    assert by_model["micronet_m0"]["parity"] <= 2e-5 and by_model["micronet_m0+relu"]["parity"] is None
