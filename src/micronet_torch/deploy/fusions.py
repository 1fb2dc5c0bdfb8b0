"""Rewrites that fuse or reshape operations for a runtime's fast kernels, each exact (``docs/deploy.md``).

Channel multipliers expanded into plain depthwise convs, factorized k x 1 / 1 x k pairs merged with a border
correction, the stem computed on 2 x 2 phases, each Dynamic Shift-Max's scale moved into the next conv, and a
dense 1 x 1 conv paired with the Dynamic Shift-Max it feeds (twin convs, for the gather-free graphs).
"""

from __future__ import annotations

import copy

import torch

from .ir import NCHWC_BLOCK, Conv, ConvShiftMax, Op, PhaseStem, Pointwise, ShiftMax
from .permutations import is_identity


def expand_multipliers(ops: list[Op], max_channels: int = NCHWC_BLOCK, through_shift_max: bool = False) -> list[Op]:
    """Make channel-multiplying depthwise convs plain depthwise ones by repeating their input channels.

    A conv with one input per group and m outputs per group reads input o // m for output o. If its
    producer (a conv, across pointwise activations) emits every channel m times, output o can read
    input o instead: the conv becomes a depthwise conv, which ONNX Runtime runs in its fast blocked
    layout instead of a loop over groups. Repeating a conv's output rows is exact. Done only while the
    producer stays within ``max_channels`` outputs: ONNX Runtime pads channels to blocks of 16 (AVX-512;
    8 with AVX2) anyway, so up to there the repeats cost no extra work.
    """
    ops = list(ops)
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if not isinstance(op, Conv) or op.groups != op.in_channels or op.out_channels == op.in_channels:
            continue
        m = op.out_channels // op.in_channels
        if op.out_channels > max_channels:
            continue
        j = i - 1
        while j >= 0 and isinstance(ops[j], Pointwise):
            j -= 1
        if j < 0:
            continue
        prod = ops[j]
        if isinstance(prod, Conv):
            rep = Conv(
                prod.weight.repeat_interleave(m, 0),
                prod.bias.repeat_interleave(m),
                prod.stride,
                prod.padding,
                prod.groups,
            )
            ops[j] = rep
        elif isinstance(prod, ShiftMax) and through_shift_max:
            ops[j] = copy.copy(prod)
            ops[j].out_perm = prod.out_perm.repeat_interleave(m)
        else:
            continue
        ops[i] = Conv(op.weight, op.bias, op.stride, op.padding, op.out_channels)
    return ops


def _is_1d_conv(op: Op, axis: int) -> bool:
    """A conv with a 1-tap kernel, stride 1 and no padding along ``axis`` (0: rows, 1: columns), no border map."""
    return (
        isinstance(op, Conv)
        and op.edge is None
        and op.weight.shape[2 + axis] == 1
        and op.stride[axis] == 1
        and op.padding[axis] == 0
    )


def is_row_conv(op: Op) -> bool:
    """A 1 x k conv (stride and padding along the width only) with one input per group and no border map."""
    return _is_1d_conv(op, 0) and op.groups == op.in_channels


def _separable_pair(a: Op, b: Op) -> bool:
    """``a`` a k x 1 conv and ``b`` a 1 x k conv with one input per group reading it (stride along its own axis)."""
    return _is_1d_conv(a, 1) and is_row_conv(b) and b.in_channels == a.out_channels


def merge_separable(
    ops: list[Op], plain_only: bool = False, stem_only: bool = False, skip_stem: bool = False
) -> list[Op]:
    """Merge every k x 1 conv directly followed by a 1 x k depthwise conv (with multiplier) into one k x k conv.

    Output o of the second conv reads channel ``a = o // m`` of the first, so the composite kernel is
    ``W[o, :, i, j] = w2[o, j] * w1[a, :, i]`` with the first conv's groups, stride (s1, s2) and padding
    (p1, p2), and bias ``b2[o] + b1[a] * sum_j w2[o, j]``. Exact except where tap j reads the horizontal
    zero padding of the intermediate: there the original sees 0, not the bias b1; the merged conv zero-pads
    the *input* instead, so the term ``b1[a] * w2[o, j]`` must be taken off at those border columns
    (``Conv.edge``; ``EdgeCorrectedConv`` adds the correction). ``plain_only`` merges only the pairs whose
    result is a dense or a depthwise conv (ONNX Runtime's fast blocked layout takes those, not convs with
    a channel multiplier). ``stem_only`` merges only the pairs with a dense first conv (the stem) and a
    depthwise pair right after one of those (across an activation): the pattern ``phase_stem`` takes.
    ``skip_stem`` leaves the pairs with a dense first conv (the stem) as they are.
    """
    out: list[Op] = []
    i = 0
    while i < len(ops):
        if (
            i + 1 < len(ops)
            and _separable_pair(ops[i], ops[i + 1])
            and (not plain_only or ops[i].groups in (1, ops[i + 1].out_channels))
            and (not stem_only or ops[i].groups == 1 or _after_merged_stem(out, ops[i + 1]))
            and not (skip_stem and ops[i].groups == 1)
        ):
            a, b = ops[i], ops[i + 1]
            m = b.out_channels // b.in_channels
            src = torch.arange(b.out_channels) // m  # first-conv channel read by each output
            w1 = a.weight[src, :, :, 0]  # (C_out, C_in/g, k1)
            w2 = b.weight[:, 0, 0, :]  # (C_out, k2)
            weight = w1.unsqueeze(3) * w2.view(w2.shape[0], 1, 1, -1)
            bias = b.bias + a.bias[src] * w2.sum(1)
            edge = -a.bias[src].view(-1, 1) * w2
            out.append(
                Conv(weight, bias, (a.stride[0], b.stride[1]), (a.padding[0], b.padding[1]), a.groups, edge=edge)
            )
            i += 2
        else:
            out.append(ops[i])
            i += 1
    return out


def _after_merged_stem(done: list[Op], b: Op) -> bool:
    """True if the merged ops so far end with a merged dense conv (then pointwise ops) and ``b`` is depthwise."""
    j = len(done) - 1
    while j >= 0 and isinstance(done[j], Pointwise):
        j -= 1
    prev = done[j] if j >= 0 else None
    return (
        j < len(done) - 1
        and isinstance(prev, Conv)
        and prev.groups == 1
        and prev.edge is not None
        and b.in_channels == b.out_channels
    )


def _is_3x3_s2(op: Op) -> bool:
    return (
        isinstance(op, Conv) and tuple(op.weight.shape[2:]) == (3, 3) and op.stride == (2, 2) and op.padding == (1, 1)
    )


def phase_stem(ops: list[Op]) -> list[Op]:
    """Mark a dense 3 x 3 stride-2 conv -> activation -> depthwise 3 x 3 stride-2 conv (MicroNet's stem and
    first depthwise, once merged and expanded) for ``PhaseStemConv``, which computes it on 2 x 2 phases."""
    out: list[Op] = []
    i = 0
    while i < len(ops):
        a = ops[i]
        if i + 2 < len(ops) and _is_3x3_s2(a) and a.groups == 1 and isinstance(ops[i + 1], Pointwise):
            b = ops[i + 2]
            if _is_3x3_s2(b) and b.groups == b.in_channels == b.out_channels == a.out_channels:
                out.append(PhaseStem(a, ops[i + 1].module, b))
                i += 3
                continue
        out.append(a)
        i += 1
    return out


def fold_shift_max_scale(ops: list[Op]) -> list[Op]:
    """Let the convolution after a Dynamic Shift-Max carry its coefficient scale s (conv(s y) = (s W) y + b).

    The activation is positively homogeneous in its coefficients (max_k sum_j s a_kj x_j = s max_k ...),
    so it can output y / s and use h-sigmoid + offset as coefficients: one fused Gemm in ONNX Runtime.
    """
    ops = list(ops)
    for i in range(len(ops) - 1):
        op, nxt = ops[i], ops[i + 1]
        if isinstance(op, ShiftMax) and isinstance(nxt, Conv) and not op.scaled:
            ops[i] = copy.copy(op)
            ops[i].scaled = True
            ops[i + 1] = Conv(nxt.weight * op.scale, nxt.bias, nxt.stride, nxt.padding, nxt.groups, nxt.edge)
    return ops


def pair_shift_convs(ops: list[Op]) -> list[Op]:
    """Pair each 1 x 1 dense conv with the Dynamic Shift-Max (J = 2) that directly follows it (``ConvShiftMax``).

    Only a dense conv can emit any row order; a grouped one would have to read other groups for the shifted
    rows, and a k x k one would double a costlier conv.
    """
    out: list[Op] = []
    i = 0
    while i < len(ops):
        op, nxt = ops[i], ops[i + 1] if i + 1 < len(ops) else None
        if (
            isinstance(op, Conv)
            and op.groups == 1
            and op.weight.shape[2:] == (1, 1)
            and isinstance(nxt, ShiftMax)
            and nxt.j == 2
            and is_identity(nxt.in_perm)
            and is_identity(nxt.out_perm)
        ):
            out.append(ConvShiftMax(op, nxt))
            i += 2
            continue
        out.append(op)
        i += 1
    return out
