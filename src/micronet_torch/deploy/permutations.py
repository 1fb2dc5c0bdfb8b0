"""Moving channel permutations to where they cost nothing: into Dynamic Shift-Max gathers and conv weights.

Each channel shuffle is a ``Perm``; consecutive ones compose, pointwise activations commute with them, a
grouped conv absorbs one that moves whole groups, and a Dynamic Shift-Max absorbs any into its gather
(``optimize``). Graphs without gathers keep each Dynamic Shift-Max in its logical channel order instead: there
permutations go into conv weights (``fold_perms_into_convs``), past a Dynamic Shift-Max that needs no more
channel rolls for it (``move_perms_past_shift_max``), or into a small grouped conv made dense
(``densify_shuffles``).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..ops.shuffle import compose_permutations
from .ir import Conv, Op, Perm, Pointwise, ShiftMax


def is_identity(index: torch.Tensor) -> bool:
    """True if ``x[:, index]`` is ``x``."""
    return bool(torch.equal(index, torch.arange(index.numel())))


def conv_output_perm(conv: Conv, q: torch.Tensor) -> tuple[Conv, torch.Tensor] | None:
    """Rewrite ``conv(x)[:, q]`` as ``conv2(x[:, qin])``; None when q mixes the conv's output groups.

    A grouped conv can emit its outputs in the order q only if every new output group holds the
    outputs of one old group; the old groups then move as whole blocks, which reorders the inputs.
    """
    so, si = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    groups_of = (q // so).view(conv.groups, so)
    if not bool((groups_of == groups_of[:, :1]).all()):
        return None
    sigma = groups_of[:, 0]  # new group g' is old group sigma[g']
    new = Conv(conv.weight[q], conv.bias[q], conv.stride, conv.padding, conv.groups)
    qin = (sigma.view(-1, 1) * si + torch.arange(si).view(1, -1)).reshape(-1)
    return new, qin


def conv_input_perm(conv: Conv, q: torch.Tensor) -> tuple[Conv, torch.Tensor] | None:
    """Rewrite ``conv(x[:, q])`` as ``conv2(x)[:, qout]``; None when q mixes the conv's input groups.

    Logical input group g must be one actual block sigma(g); the conv then runs group g at sigma(g),
    with its weight columns in the actual order, and its outputs come out block-permuted.
    """
    g = conv.groups
    so, si = conv.out_channels // g, conv.in_channels // g
    blocks = (q // si).view(g, si)
    if not bool((blocks == blocks[:, :1]).all()):
        return None
    sigma = blocks[:, 0]  # logical group g sits at actual block sigma[g]
    weight = torch.empty_like(conv.weight)
    bias = torch.empty_like(conv.bias)
    for lg in range(g):
        ag = int(sigma[lg])
        cols = (q[lg * si : (lg + 1) * si] % si).tolist()  # logical column r sits at actual column cols[r]
        block = conv.weight[lg * so : (lg + 1) * so]
        new_block = torch.empty_like(block)
        new_block[:, cols] = block
        weight[ag * so : (ag + 1) * so] = new_block
        bias[ag * so : (ag + 1) * so] = conv.bias[lg * so : (lg + 1) * so]
    qout = (sigma.view(-1, 1) * so + torch.arange(so).view(1, -1)).reshape(-1)
    return Conv(weight, bias, conv.stride, conv.padding, g), qout


def _try_move_back(ops: list[Op], i: int) -> list[Op] | None:
    """Move the Perm at ``i`` backwards until a Dynamic Shift-Max absorbs it (or a dense conv does).

    Returns the rewritten list, or None when the permutation would only get stuck elsewhere.
    """
    ops = list(ops)
    q = ops[i].index
    del ops[i]
    j = i - 1
    while j >= 0:
        op = ops[j]
        if isinstance(op, Perm):
            q = compose_permutations(op.index, q)
            del ops[j]
            j -= 1
        elif isinstance(op, Pointwise):
            j -= 1
        elif isinstance(op, ShiftMax):
            ops[j] = copy.copy(op)
            ops[j].out_perm = compose_permutations(op.out_perm, q)
            return ops
        elif isinstance(op, Conv):
            moved = conv_output_perm(op, q)
            if moved is None:
                return None
            ops[j], q = moved
            if is_identity(q):
                return ops
            j -= 1
        else:
            return None
        if is_identity(q):
            return ops
    return None


def _move_forward(ops: list[Op], i: int) -> list[Op]:
    """Move the Perm at ``i`` forwards into Dynamic Shift-Max gathers and conv weights; keep the rest."""
    ops = list(ops)
    q = ops[i].index
    del ops[i]
    j = i
    while j < len(ops):
        op = ops[j]
        if is_identity(q):
            return ops
        if isinstance(op, Perm):
            q = compose_permutations(q, op.index)
            del ops[j]
        elif isinstance(op, Pointwise):
            j += 1
        elif isinstance(op, ShiftMax):
            ops[j] = copy.copy(op)
            ops[j].in_perm = compose_permutations(q, op.in_perm)
            return ops
        elif isinstance(op, Conv):
            moved = conv_input_perm(op, q)
            if moved is None:
                break
            ops[j], q = moved
            j += 1
        else:
            break
    if not is_identity(q):
        ops.insert(j, Perm(q))
    return ops


def optimize(ops: list[Op]) -> list[Op]:
    """Fold every permutation that can be folded: backwards into gathers first, then forwards."""
    i = len(ops) - 1
    while i >= 0:
        if isinstance(ops[i], Perm):
            moved = _try_move_back(ops, i)
            if moved is not None:
                ops = moved
        i = min(i - 1, len(ops) - 1)
    i = 0
    while i < len(ops):
        if isinstance(ops[i], Perm):
            before = len(ops)
            ops = _move_forward(ops, i)
            if len(ops) == before and isinstance(ops[i], Perm):
                i += 1  # stuck here: it stays an explicit gather
            continue
        i += 1
    return ops


def fold_perms_into_convs(ops: list[Op]) -> list[Op]:
    """Move each channel permutation into a neighbouring convolution's weights where that is exact.

    Unlike ``optimize`` a permutation never enters a Dynamic Shift-Max (that would scatter its channel
    ranges into single channels); it moves back through activations into the producing conv's output rows, or
    forward into the consuming conv's input columns, and stays an explicit (gather-free) permutation otherwise.
    """
    ops = list(ops)
    i = 0
    while i < len(ops):
        op = ops[i]
        if not isinstance(op, Perm):
            i += 1
            continue
        j = i - 1
        while j >= 0 and isinstance(ops[j], Pointwise):
            j -= 1
        if j >= 0 and isinstance(ops[j], Conv) and ops[j].edge is None:  # a merged pair's border terms stay put
            moved = conv_output_perm(ops[j], op.index)
            if moved is not None and is_identity(moved[1]):
                ops[j] = moved[0]
                del ops[i]
                continue
        k = i + 1
        while k < len(ops) and isinstance(ops[k], Pointwise):
            k += 1
        if k < len(ops) and isinstance(ops[k], Conv) and ops[k].edge is None:
            moved = conv_input_perm(ops[k], op.index)
            if moved is not None:
                ops[k], q = moved
                if is_identity(q):
                    del ops[i]
                    continue
                ops[i] = Perm(q)  # the conv's outputs now come out block-permuted: carry that on
                ops.insert(k, ops.pop(i))  # the permutation now follows the conv
                i = k
                continue
        if i + 1 < len(ops) and isinstance(ops[i + 1], Perm):  # compose adjacent permutations
            ops[i] = Perm(compose_permutations(op.index, ops[i + 1].index))
            del ops[i + 1]
            continue
        if is_identity(op.index):
            del ops[i]
            continue
        i += 1
    return ops


def _roll_count(shift: torch.Tensor) -> int:
    """How many channel rolls a gather-free Dynamic Shift-Max needs for this shift (its distinct channel offsets)."""
    return len(set(((shift - torch.arange(shift.numel())) % shift.numel()).tolist()))


def move_perms_past_shift_max(ops: list[Op]) -> list[Op]:
    """Move a channel permutation from before a Dynamic Shift-Max to after it where that needs no more rolls.

    ``DSM(t[:, P]) = DSM'(t)[:, P]`` for the DSM' that runs in t's channel order: shift ``P[S[P^-1]]``, its
    hyper-function's input columns and coefficient rows permuted by ``P^-1`` (exact). After it the permutation
    moves into the next dense conv's input columns (``fold_perms_into_convs``), so an explicit shuffle goes.
    """
    ops = list(ops)
    for i in range(1, len(ops) - 1):
        perm, op, nxt = ops[i - 1], ops[i], ops[i + 1]
        if not (isinstance(perm, Perm) and isinstance(op, ShiftMax) and op.j == 2):
            continue
        if not (is_identity(op.in_perm) and is_identity(op.out_perm)):
            continue
        if not (isinstance(nxt, Conv) and nxt.groups == 1):  # where the permutation can go without a trace
            continue
        p = perm.index
        inv = torch.argsort(p)
        shift = p[op.shift[inv]]
        if _roll_count(shift) > _roll_count(op.shift):
            continue
        c = op.channels
        rows = (torch.arange(op.k * op.j).view(-1, 1) * c + inv.view(1, -1)).reshape(-1)  # (k, j, c) blocks
        ops[i - 1] = replace(op, w1=op.w1[:, inv], w2=op.w2[rows], b2=op.b2[rows], offset=op.offset[rows], shift=shift)
        ops[i] = perm
    return ops


def _dense(conv: Conv) -> Conv:
    """A grouped conv as a dense one with a block-diagonal weight (exact: the added products are zeros)."""
    g = conv.groups
    so, si = conv.out_channels // g, conv.in_channels // g
    w = conv.weight.new_zeros(conv.out_channels, conv.in_channels, *conv.weight.shape[2:])
    for gi in range(g):
        w[gi * so : (gi + 1) * so, gi * si : (gi + 1) * si] = conv.weight[gi * so : (gi + 1) * so]
    return Conv(w, conv.bias, conv.stride, conv.padding, 1, conv.edge)


def _densifiable(op: Op, max_groups: int) -> bool:
    return isinstance(op, Conv) and 1 < op.groups <= max_groups and op.groups < op.in_channels


def densify_shuffles(ops: list[Op], max_groups: int = 8) -> list[Op]:
    """Absorb each channel shuffle into the grouped (not depthwise) conv next to it by making that conv dense.

    A shuffle next to a grouped conv mixes its groups, so it cannot move into the grouped weights; the dense
    conv with the block-diagonal weight (g times the multiply-adds of a small pointwise conv) takes any
    permutation of its inputs or outputs exactly, and removes a transpose and its layout conversions.
    """
    ops = list(ops)
    i = 0
    while i < len(ops):
        if not isinstance(ops[i], Perm):
            i += 1
            continue
        q = ops[i].index
        k = i + 1
        while k < len(ops) and isinstance(ops[k], Pointwise | Perm):
            if isinstance(ops[k], Perm):
                break
            k += 1
        j = i - 1
        while j >= 0 and isinstance(ops[j], Pointwise):
            j -= 1
        if k < len(ops) and _densifiable(ops[k], max_groups):
            dense = _dense(ops[k])
            ops[k] = Conv(dense.weight[:, torch.argsort(q)], dense.bias, dense.stride, dense.padding, 1, dense.edge)
            del ops[i]
            continue
        if j >= 0 and _densifiable(ops[j], max_groups):
            dense = _dense(ops[j])
            ops[j] = Conv(dense.weight[q], dense.bias[q], dense.stride, dense.padding, 1, dense.edge)
            del ops[i]
            continue
        i += 1
    return ops
