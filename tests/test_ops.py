"""Property tests of the operators: shuffles, the shift, Dynamic Shift-Max, micro-factorized convolutions."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micronet_torch.ops import (
    ChannelShuffle,
    DepthwiseConvBN,
    DynamicShiftMax,
    GroupConvBN,
    MicroFactorizedDepthwise,
    MicroFactorizedPointwise,
    channel_shuffle,
    compose_permutations,
    group_adaptive_groups,
    invert_permutation,
    shift_index,
    shuffle_permutation,
    squeeze_channels,
)

groups_and_width = st.tuples(st.integers(1, 6), st.integers(1, 6))


@settings(max_examples=30, deadline=None)
@given(groups_and_width)
def test_channel_shuffle_is_the_transpose_of_the_group_grid(gw):
    g, w = gw
    c = g * w
    x = torch.randn(2, c, 3, 2)
    y = channel_shuffle(x, g)
    for i in range(c):  # output channel i = p*g + q takes input channel q*w + p
        p, q = divmod(i, g)
        assert torch.equal(y[:, i], x[:, q * w + p])
    assert torch.equal(y, x[:, shuffle_permutation(c, g)])
    assert torch.equal(ChannelShuffle(g)(x), y)


@settings(max_examples=30, deadline=None)
@given(groups_and_width, st.integers(1, 6))
def test_permutations_compose_and_invert(gw, g2):
    g, w = gw
    c = g * w * g2
    x = torch.randn(1, c, 2, 2)
    a, b = shuffle_permutation(c, g), shuffle_permutation(c, g2)
    assert torch.equal(x[:, a][:, b], x[:, compose_permutations(a, b)])
    assert torch.equal(x[:, a][:, invert_permutation(a)], x)


@settings(max_examples=40, deadline=None)
@given(groups_and_width)
def test_published_shift_rotates_group_and_position(gw):
    g, w = gw
    c = g * w
    idx = shift_index(c, g, "published")
    grp = shift_index(c, g, "group")
    for gi in range(g):
        for p in range(w):
            assert idx[gi * w + p] == ((gi + 1) % g) * w + (p + 1) % w
            assert grp[gi * w + p] == ((gi + 1) % g) * w + p
    assert sorted(idx.tolist()) == list(range(c))


def _reference_dsm(m: DynamicShiftMax, x: torch.Tensor) -> torch.Tensor:
    """SPEC section 1 written out literally: coefficients, then max over K of the J-term fusions."""
    c = x.shape[1]
    y = m.fc(x.mean((2, 3)))
    y = ((y - 0.5) * 4.0)[:, :, None, None]
    xs = x[:, shift_index(c, m.groups, m.shift_mode)]
    pieces = torch.split(y, c, dim=1)
    terms = []
    for k in range(m.k):
        if m.j == 2:
            a, b = pieces[2 * k] + m.init_a[k], pieces[2 * k + 1] + m.init_b[k]
            terms.append(x * a + xs * b)
        else:
            terms.append(x * (pieces[k] + m.init_a[k]))
    return terms[0] if m.k == 1 else torch.max(terms[0], terms[1])


@settings(max_examples=25, deadline=None)
@given(groups_and_width, st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from(["published", "group"]))
def test_dynamic_shift_max_matches_its_formula(gw, k, j, shift):
    g, w = gw
    c = g * w * 2
    torch.manual_seed(c * 7 + k + j)
    m = DynamicShiftMax(c, g, k=k, j=j, reduction=4, init_a=(1.0, 0.5), init_b=(0.0, 0.5), shift=shift)
    x = torch.randn(3, c, 4, 5)
    torch.testing.assert_close(m(x), _reference_dsm(m, x), rtol=1e-5, atol=1e-6)
    assert m.fc[2].out_features == c * j * k
    assert "index" not in m.state_dict() and "offset" not in m.state_dict()


def test_dsm_at_zero_hyper_output_is_its_initial_offsets():
    m = DynamicShiftMax(8, 2, k=2, init_a=(1.0, 0.5), init_b=(0.0, 0.5))
    for p in m.fc.parameters():
        torch.nn.init.zeros_(p)
    # fc output 0 -> hard-sigmoid 0.5 -> coefficient offset only: max(x, 0.5 x + 0.5 x~)
    x = torch.randn(2, 8, 3, 3)
    xs = x[:, shift_index(8, 2)]
    torch.testing.assert_close(m(x), torch.maximum(x, 0.5 * x + 0.5 * xs))


def test_dsm_squeeze_width_and_errors():
    assert squeeze_channels(384, 16) == 24 and squeeze_channels(8, 8) == 4
    with pytest.raises(ValueError, match="groups dividing channels"):
        DynamicShiftMax(10, 4)
    with pytest.raises(ValueError, match="K in"):
        DynamicShiftMax(8, 2, k=3)
    with pytest.raises(ValueError, match="unknown shift mode"):
        shift_index(8, 2, "sideways")


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([8, 16, 24, 36, 64]), st.sampled_from([2, 4]))
def test_micro_factorized_pointwise_is_a_low_rank_1x1(c, r):
    g = group_adaptive_groups(c, r)
    assert (c // r) % g == 0 and c % g == 0
    m = MicroFactorizedPointwise(c, c, reduction=r).eval()
    x = torch.randn(2, c, 3, 3)
    # with BN at identity it equals one dense 1x1 conv W = P . Phi . Q^T
    q = m.squeeze.conv[0].weight
    p = m.expand.conv[0].weight
    dense_q = torch.block_diag(*q.squeeze(-1).squeeze(-1).chunk(g, 0))
    dense_p = torch.block_diag(*p.squeeze(-1).squeeze(-1).chunk(g, 0))
    phi = torch.eye(c // r)[shuffle_permutation(c // r, g)]
    w = dense_p @ phi @ dense_q
    scale = (1 + 1e-5) ** -0.5  # eval-mode BN with fresh statistics divides by sqrt(1 + eps)
    expected = torch.nn.functional.conv2d(x, w[:, :, None, None]) * scale * scale
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)
    assert w.shape == (c, c)


def test_group_adaptive_choice():
    assert group_adaptive_groups(64, 4) == 4  # sqrt(16)
    assert group_adaptive_groups(96, 2) in (6, 8)  # sqrt(48) ~ 6.9, divisors 6 and 8
    with pytest.raises(ValueError, match="must divide"):
        group_adaptive_groups(10, 4)


@pytest.mark.parametrize("k,s,e", [(3, 1, (1, 1)), (5, 2, (2, 2)), (3, 2, (1, 4))])
def test_micro_factorized_depthwise_shapes_and_cost(k, s, e):
    m = MicroFactorizedDepthwise(4, k, s, e)
    full = DepthwiseConvBN(4, k, s, e)
    x = torch.randn(2, 4, 16, 16)
    assert m(x).shape == full(x).shape == (2, 4 * e[0] * e[1], 16 // s, 16 // s)
    n_micro = sum(p.numel() for n, p in m.named_parameters() if "conv.0" in n or "conv.2" in n)
    n_full = full.conv[0].weight.numel()
    assert n_micro < n_full or k == 1


def test_group_conv_rejects_bad_groups():
    with pytest.raises(ValueError, match="must divide"):
        GroupConvBN(6, 8, groups=4)
