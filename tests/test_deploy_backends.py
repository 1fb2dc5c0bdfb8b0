"""The deploy backend table: every row drawn from the one pass list, exact, and equal to its option form."""

from __future__ import annotations

import pytest
import torch

import micronet_torch
from micronet_torch.deploy import (
    BACKENDS,
    PASSES,
    PORTABLE_OPTIONS,
    RUNTIME_BACKENDS,
    RUNTIME_OPTIONS,
    convert_to_deploy,
)
from micronet_torch.deploy.backends import Backend, portable_form, row
from micronet_torch.deploy.passes import step
from micronet_torch.tools.bench import trained_like

TOL = 2e-5


@pytest.fixture(scope="module")
def m0() -> torch.nn.Module:
    return trained_like(micronet_torch.create_model("micronet_m0"), img_size=32).eval()


@pytest.mark.parametrize("name", list(BACKENDS))
def test_row_is_exact(m0: torch.nn.Module, name: str) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = m0(x), convert_to_deploy(m0, backend=name)(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL
    assert all(p.name in PASSES for p in BACKENDS[name].passes)


def test_runtime_options_are_the_rows_options(m0: torch.nn.Module) -> None:
    assert RUNTIME_OPTIONS == {
        "onnx": {},
        "openvino": {"merge": "all"},
        "executorch": {"merge": "all"},
        "litert": {"merge": "all"},
        "ncnn": {"merge": "all", "block_shuffles": False},
    }
    for rt, name in RUNTIME_BACKENDS.items():
        by_row = convert_to_deploy(m0, backend=name)
        by_options = convert_to_deploy(m0, backend="portable", **RUNTIME_OPTIONS[rt])
        assert repr(by_row) == repr(by_options)
        pairs = zip(by_row.state_dict().values(), by_options.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


def test_options_rebuild_the_row() -> None:
    assert PORTABLE_OPTIONS == (
        "scale_into_conv",
        "densify",
        "merge",
        "expand",
        "twin_conv",
        "move_perms",
        "block_shuffles",
    )
    ncnn = BACKENDS["portable-ncnn"]
    assert ncnn.with_options(block_shuffles=True).options == {"merge": "all", "block_shuffles": True}
    assert ncnn.with_options(merge="all", block_shuffles=True).passes == BACKENDS["portable-openvino"].passes
    assert "pair_shift_convs" not in [p.name for p in BACKENDS["portable-xnnpack-fused"].passes]
    assert BACKENDS["onnx"].with_options(merge_pairs=False).passes == tuple(
        step(n) for n in ("optimize", "expand_multipliers", "optimize", "fold_shift_max_scale")
    )


def test_bad_backend_or_option(m0: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        convert_to_deploy(m0, backend="tflite")
    with pytest.raises(TypeError, match="takes no option"):
        convert_to_deploy(m0, backend="eager", merge="all")
    with pytest.raises(TypeError, match="takes no option"):
        convert_to_deploy(m0, backend="portable-ncnn", twin_convs=False)
    with pytest.raises(ValueError, match="unknown deploy pass"):
        step("no_such_pass")
    fixed = Backend("fixed", BACKENDS["portable"].passes, BACKENDS["portable"].emitter)
    with pytest.raises(TypeError, match="takes no option"):
        fixed.with_options(merge="all")


def test_a_new_row_is_one_line(m0: torch.nn.Module) -> None:
    variant = row("portable-stem", portable_form, merge="stem", twin_conv=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref, out = m0(x), variant.emitter(m0, variant.ops(m0))(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL
