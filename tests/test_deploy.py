"""Deploy mode: same outputs as eager (2e-5 relative) for every variant and fixture, with BN folding really tested
(every registered model through every backend row: ``test_models.py::test_deploy_parity``)."""

from __future__ import annotations

import pytest
import torch
from helpers import ABLATION_VARIANTS, official_model_and_io
from torch import nn

import micronet_torch
from micronet_torch.deploy import (
    ChannelGather,
    Conv,
    FusedShiftMax,
    Perm,
    PhaseStemConv,
    convert_to_deploy,
    deploy_summary,
    lower,
    optimize,
)
from micronet_torch.ops import DynamicShiftMax

TOL = 2e-5


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics/affines and Linear weights large enough that every fold matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("size", [(224, 224), (68, 36), (66, 70), (33, 45)])
def test_phase_stem(size: tuple[int, int]) -> None:
    """M0's ONNX layout computes its stem on 2 x 2 phases: exact on sizes that are multiples of 4 (edge
    corrections included), the plain path elsewhere; both agree with the eager model."""
    model = randomize(micronet_torch.create_model("micronet_m0"), seed=2)
    deployed = convert_to_deploy(model, backend="onnx")
    stems = [m for m in deployed.modules() if isinstance(m, PhaseStemConv)]
    assert len(stems) == 1 and stems[0].wa.shape == (16, 3, 5, 5)  # 4 distinct channels x 4 phases
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert rel_diff(deployed(x), model(x)) <= TOL
        assert rel_diff(stems[0](x), stems[0].plain(x)) <= 1e-5


@pytest.mark.parametrize("variant", ABLATION_VARIANTS)
def test_parity_variants(variant: dict) -> None:
    model = randomize(micronet_torch.create_model("micronet_m3", num_classes=10, **variant), seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(convert_to_deploy(model, backend="onnx")(x), model(x)) <= TOL


@pytest.mark.parametrize("name", ["m0", "m2"])
def test_parity_fixtures(name: str) -> None:
    model, ref = official_model_and_io(name)
    for backend in ("eager", "onnx"):
        with torch.no_grad():
            out = convert_to_deploy(model, backend=backend)(ref["input"])
        assert rel_diff(out, ref["logits"]) <= TOL


def test_permutations_are_folded() -> None:
    """M0: 24 shuffles become 1 explicit gather; every other one lives in a DSM gather or conv weights."""
    ops = lower(micronet_torch.create_model("micronet_m0").eval())
    before, after = deploy_summary(ops), deploy_summary(optimize(ops))
    assert before["Perm"] == 24 and after.get("Perm", 0) <= 1
    assert after["Conv"] == before["Conv"] and after["ShiftMax"] == 15


def test_no_batchnorm_or_shuffle_left() -> None:
    deployed = convert_to_deploy(micronet_torch.create_model("micronet_m0").eval())
    kinds = {type(m) for m in deployed.modules()}
    assert not kinds & {nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, DynamicShiftMax}
    assert FusedShiftMax in kinds
    gathers = [m for m in deployed.modules() if isinstance(m, ChannelGather)]
    assert len(gathers) <= 1
    # the ONNX layout repeats the stem's channels; the stem's permutation then folds into its weights too
    onnx_layout = convert_to_deploy(micronet_torch.create_model("micronet_m0").eval(), backend="onnx")
    assert not any(isinstance(m, ChannelGather) for m in onnx_layout.modules())


def test_shift_max_equivariance_random() -> None:
    """A DSM between random permutations, folded into one gather, equals the original."""
    torch.manual_seed(3)
    dsm = DynamicShiftMax(24, 4, k=2, init_a=(1.0, 0.5), init_b=(0.0, 0.5)).eval()
    with torch.no_grad():
        dsm.fc[2].weight.normal_(0, 1.0)
    pin, pout = torch.randperm(24), torch.randperm(24)
    from micronet_torch.deploy import build_modules as _build
    from micronet_torch.deploy import shift_max_op as _shift_max_op

    ops = [Perm(pin), _shift_max_op(dsm), Perm(pout)]
    net = _build(optimize(ops), torch.float32, use_matmul=True)
    assert not any(isinstance(m, ChannelGather) for m in net.modules())
    x = torch.randn(3, 24, 16, 16)
    with torch.no_grad():
        ref = dsm(x[:, pin])[:, pout]
        assert rel_diff(net(x), ref) <= 1e-5


def test_grouped_conv_permutation_rules() -> None:
    """A block permutation passes through a grouped conv; a shuffle across groups does not."""
    from micronet_torch.deploy import conv_input_perm as _conv_input_perm
    from micronet_torch.deploy import conv_output_perm as _conv_output_perm

    conv = Conv(torch.randn(8, 2, 1, 1, dtype=torch.float64), torch.randn(8, dtype=torch.float64), (1, 1), (0, 0), 4)
    block = torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])  # swaps groups 0<->1 and 2<->3 of the 8 inputs
    assert _conv_input_perm(conv, block) is not None
    shuffle = torch.arange(8).view(4, 2).t().reshape(-1)
    assert _conv_input_perm(conv, shuffle) is None
    assert _conv_output_perm(conv, shuffle) is None
    new, qin = _conv_output_perm(conv, block)
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64)
    f = lambda c, t: torch.nn.functional.conv2d(t, c.weight, c.bias, groups=c.groups)  # noqa: E731
    assert torch.allclose(f(conv, x)[:, block], f(new, x[:, qin]))


@pytest.mark.parametrize("stride,k,width", [(2, 3, 57), (2, 5, 30), (1, 5, 13), (1, 3, 8)])
def test_merge_separable_exact_at_borders(stride: int, k: int, width: int) -> None:
    """k x 1 then 1 x k (channel multipliers, BN biases) equals one k x k conv plus the border correction."""
    from micronet_torch.deploy import EdgeCorrectedConv, merge_separable
    from micronet_torch.deploy import build_modules as _build

    g = torch.Generator().manual_seed(k * 10 + width)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    p = k // 2
    for cin, groups in [(3, 1), (4, 4)]:  # the stem (dense first conv) and Micro-Block-A (grouped first conv)
        c1 = Conv(rnd(2 * cin, cin // groups, k, 1), rnd(2 * cin), (stride, 1), (p, 0), groups)
        c2 = Conv(rnd(4 * cin, 1, 1, k), rnd(4 * cin), (1, stride), (0, p), 2 * cin)
        merged = merge_separable([c1, c2])
        assert len(merged) == 1 and merged[0].edge is not None
        x = rnd(2, cin, width + 3, width)
        ref = torch.nn.functional.conv2d(x, c1.weight, c1.bias, c1.stride, c1.padding, 1, c1.groups)
        ref = torch.nn.functional.conv2d(ref, c2.weight, c2.bias, c2.stride, c2.padding, 1, c2.groups)
        for full_maps in (False, True):  # eager: one (1, C, 1, W) row broadcast; ONNX: the map at full size
            net = _build(merged, torch.float64, use_matmul=False, full_maps=full_maps).double()
            assert isinstance(net[0], EdgeCorrectedConv)
            with torch.no_grad():
                assert rel_diff(net(x), ref) <= 1e-6  # float32 weights
            rows = ref.shape[2] if full_maps else 1
            assert net[0].edge_map(width, ref.shape[2]).shape == (1, ref.shape[1], rows, ref.shape[3])


@pytest.mark.parametrize(
    "mult,k,stride,size", [(2, 3, 2, (28, 56)), (2, 5, 1, (8, 9)), (1, 3, 1, (12, 10)), (4, 3, 2, (5, 7))]
)
def test_row_folded_conv(mult: int, k: int, stride: int, size: tuple[int, int]) -> None:
    """A 1 x k conv with one input per group equals its rows-folded-into-channels form (and its fallback)."""
    from micronet_torch.deploy import NCHWC_BLOCK, RowFoldedConv
    from micronet_torch.deploy import build_modules as _build

    g = torch.Generator().manual_seed(mult * 100 + k)
    c = 4
    weight, bias = torch.randn(mult * c, 1, 1, k, generator=g), torch.randn(mult * c, generator=g)
    op = Conv(weight, bias, (1, stride), (0, k // 2), c)
    net = _build([op], torch.float32, use_matmul=True)
    assert isinstance(net[0], RowFoldedConv)
    assert not isinstance(_build([op], torch.float32, use_matmul=False)[0], RowFoldedConv)  # eager: plain conv
    x = torch.randn(2, c, *size, generator=g)
    ref = torch.nn.functional.conv2d(x, op.weight, op.bias, op.stride, op.padding, 1, op.groups)
    with torch.no_grad():
        out = net(x)
    assert out.shape == ref.shape
    assert rel_diff(out, ref) <= 1e-6
    folded = (c * size[0]) % NCHWC_BLOCK == 0
    assert len(net[0]._folded) == (1 if folded else 0)  # the folded weights exist only when the fold applies


def test_merge_pairs_counts() -> None:
    """M0: the eager backend merges all 7 factorized pairs; ONNX only the stem's and the depthwise pair after it."""
    from micronet_torch.deploy import EdgeCorrectedConv, PhaseStemConv

    model = micronet_torch.create_model("micronet_m0").eval()
    convs = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert convs(convert_to_deploy(model, merge_pairs=False)) == 24
    assert convs(convert_to_deploy(model)) == 17
    onnx_model = convert_to_deploy(model, backend="onnx")
    assert convs(onnx_model) == 22  # 24 - 2 merged pairs
    (stem,) = [m for m in onnx_model.modules() if isinstance(m, PhaseStemConv)]
    assert [isinstance(m, EdgeCorrectedConv) for m in stem.plain if isinstance(m, nn.Conv2d)] == [True, True]
    assert sum(isinstance(m, EdgeCorrectedConv) for m in onnx_model.modules()) == 2  # only the stem's two


def test_deploy_is_inference_only() -> None:
    deployed = convert_to_deploy(micronet_torch.create_model("micronet_m0").eval())
    with pytest.raises(RuntimeError):
        deployed.train()
    with pytest.raises(ValueError):
        convert_to_deploy(micronet_torch.create_model("micronet_m0"), backend="tflite")


def test_batch_and_size_independent() -> None:
    model = randomize(micronet_torch.create_model("micronet_m1", num_classes=7))
    deployed, eager_deployed = convert_to_deploy(model, backend="onnx"), convert_to_deploy(model)
    for shape in [(1, 3, 32, 32), (3, 3, 64, 48), (2, 3, 41, 57)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
            assert rel_diff(deployed(x), ref) <= TOL
            assert rel_diff(eager_deployed(x), ref) <= TOL
