"""The portable deploy form: exact to the eager model, and built only from gather-free operators of <= 4 dims."""

from __future__ import annotations

import pytest
import torch
from helpers import official_model_and_io

import micronet_torch
from micronet_torch.deploy import channel_runs, convert_to_deploy, portable_ops
from micronet_torch.deploy.ir import Perm, ShiftMax
from micronet_torch.deploy.portable import (
    ChannelShuffle4d,
    ChannelSlices,
    ConvShiftMax,
    PortableShiftMax,
    TwinConvShiftMax,
    block_shuffle,
    move_perms_past_shift_max,
    pair_shift_convs,
)
from micronet_torch.ops.shuffle import shuffle_permutation
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
        assert rel_diff(convert_to_portable(model, twin_conv=False)(x), model(x)) <= TOL
        assert rel_diff(convert_to_portable(model, move_perms=False)(x), model(x)) <= TOL
        assert rel_diff(convert_to_portable(model, block_shuffles=False)(x), model(x)) <= TOL  # ncnn
        assert rel_diff(convert_to_portable(model, merge="all")(x), model(x)) <= TOL  # OpenVINO / LiteRT / ncnn


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


@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m2"])
def test_twin_conv_emits_the_shift(name: str) -> None:
    """Each twin conv gives its conv's output in the Dynamic Shift-Max's shift order, and the pair computes
    what the channel rolls compute from the conv's output."""
    model = trained_like(micronet_torch.create_model(name))
    pairs = [op for op in pair_shift_convs(portable_ops(model)) if isinstance(op, ConvShiftMax)]
    graph = convert_to_portable(model)
    assert len(pairs) == sum(isinstance(m, TwinConvShiftMax) for m in graph.modules())
    assert len(pairs) == {"micronet_m0": 9, "micronet_m2": 10}[name]  # the DSMs fed by a dense 1 x 1 conv
    for op in pairs:
        twin, rolls = TwinConvShiftMax(op), PortableShiftMax(op.shift_max)
        assert rolls.rolls and not twin.shift_max.rolls
        x = torch.randn(2, twin.conv.in_channels, 6, 5)
        with torch.no_grad():
            y = twin.conv(x)
            assert not torch.equal(op.shift_max.shift, torch.arange(len(op.shift_max.shift)))
            torch.testing.assert_close(twin.conv_shifted(x), y[:, op.shift_max.shift], rtol=0, atol=0)
            torch.testing.assert_close(twin(x), rolls(y), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="shifted input"):
            twin.shift_max(y)


def test_perm_moved_past_shift_max_is_exact() -> None:
    """DSM(t[:, P]) = DSM'(t)[:, P]: M0's shuffles before a Dynamic Shift-Max whose conjugated shift needs no more
    rolls go past it (into the next conv), each moved DSM computes the same values in the other channel order."""
    model = trained_like(micronet_torch.create_model("micronet_m0"))
    kept = portable_ops(model, move_perms=False)
    assert sum(isinstance(op, Perm) for op in portable_ops(model)) < sum(isinstance(op, Perm) for op in kept)
    moved = move_perms_past_shift_max(kept)
    pairs = [
        (kept[i - 1], kept[i], moved[i - 1])
        for i in range(1, len(kept))
        if isinstance(kept[i], ShiftMax) and isinstance(moved[i], Perm)
    ]
    assert len(pairs) == 3  # M0: the 64-, 128- and 256-channel DSMs after their depthwise convs
    for perm, dsm, conj in pairs:
        assert isinstance(dsm, ShiftMax) and isinstance(conj, ShiftMax) and not torch.equal(dsm.shift, conj.shift)
        t = torch.randn(2, dsm.channels, 5, 4)
        with torch.no_grad():
            ref = PortableShiftMax(dsm)(t[:, perm.index])
            out = PortableShiftMax(conj)(t)[:, perm.index]
        assert len(PortableShiftMax(conj).rolls) <= len(PortableShiftMax(dsm).rolls)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("channels", "groups", "block"), [(48, 2, 4), (48, 4, 4), (12, 3, 1), (480, 10, 1), (8, 2, 2)])
def test_block_shuffle_is_one_transpose(channels: int, groups: int, block: int) -> None:
    """A shuffle of channel blocks is recognised with its (groups, block) and its 4-D module is that gather."""
    blocks = shuffle_permutation(channels // block, groups).view(-1, 1) * block + torch.arange(block).view(1, -1)
    index = blocks.reshape(-1)
    assert block_shuffle(index) == (groups, block)
    x = torch.randn(2, channels, 3, 5)
    torch.testing.assert_close(ChannelShuffle4d(groups, block)(x), x[:, index], rtol=0, atol=0)
    assert block_shuffle(torch.arange(channels)) is None
    assert block_shuffle(torch.roll(index, 1)) is None


def test_every_explicit_permutation_is_a_shuffle() -> None:
    """M0's stem shuffles blocks of 4 channels: one transpose, not 12 slices (unless ``block_shuffles`` is off)."""
    model = micronet_torch.create_model("micronet_m0").eval()
    perms = [m for m in convert_to_portable(model).modules() if isinstance(m, ChannelShuffle4d | ChannelSlices)]
    assert perms and all(isinstance(m, ChannelShuffle4d) for m in perms)
    assert [m.block for m in perms] == [4, 1]
    off = [m for m in convert_to_portable(model, block_shuffles=False).modules() if isinstance(m, ChannelSlices)]
    assert [m.runs for m in off] == [channel_runs(p.index) for p in portable_ops(model) if isinstance(p, Perm)][:1]
