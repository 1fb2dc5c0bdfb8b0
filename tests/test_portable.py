"""The portable deploy form: exact to the eager model, and built only from gather-free operators of <= 4 dims."""

from __future__ import annotations

import pytest
import torch
from helpers import official_model_and_io

import micronet_torch
from micronet_torch.deploy import channel_runs, convert_to_deploy
from micronet_torch.tools.bench import trained_like

TOL = 2e-5


def convert_to_portable(model: torch.nn.Module, **options) -> torch.nn.Module:
    return convert_to_deploy(model, backend="portable", **options)


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3"])
def test_parity(name: str) -> None:
    model = trained_like(micronet_torch.create_model(name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(convert_to_portable(model)(x), model(x)) <= TOL
        assert rel_diff(convert_to_portable(model, scale_into_conv=False)(x), model(x)) <= TOL


@pytest.mark.parametrize("name", ["m0", "m2"])
def test_parity_fixtures(name: str) -> None:
    model, ref = official_model_and_io(name)
    with torch.no_grad():
        assert rel_diff(convert_to_portable(model)(ref["input"]), ref["logits"]) <= TOL


@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m3"])
def test_graph_has_no_gather_and_no_tensor_over_4d(name: str) -> None:
    portable = convert_to_portable(micronet_torch.create_model(name).eval())
    graph = torch.export.export(portable, (torch.randn(1, 3, 64, 64),)).run_decompositions().graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any(w in t for t in targets for w in ("index_select", "gather", "index.Tensor", "amax", "max.dim"))
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.dim() <= 4, (node, tuple(val.shape))
    means = [n for n in graph.nodes if "mean" in str(n.target)]
    assert means and all(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim") for n in means)


def test_channel_runs() -> None:
    assert channel_runs(torch.tensor([2, 3, 0, 1])) == [(2, 4), (0, 2)]
    assert channel_runs(torch.arange(5)) == [(0, 5)]


def test_options_only_for_portable() -> None:
    model = micronet_torch.create_model("micronet_m0").eval()
    with pytest.raises(TypeError, match="merge"):
        convert_to_deploy(model, backend="onnx", merge="all")
    with pytest.raises(ValueError, match="merge"):
        convert_to_deploy(model, backend="portable", merge="some")
