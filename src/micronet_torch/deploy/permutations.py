"""Moving channel permutations to where they cost nothing: into Dynamic Shift-Max gathers and conv weights.

Each channel shuffle is a ``Perm``; consecutive ones compose, pointwise activations commute with them, a
grouped conv absorbs one that moves whole groups, and a Dynamic Shift-Max absorbs any into its gather.
"""

from __future__ import annotations

import copy

import torch

from ..ops.shuffle import compose_permutations
from .ir import Conv, Op, Perm, Pointwise, ShiftMax


def _is_identity(index: torch.Tensor) -> bool:
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
            if _is_identity(q):
                return ops
            j -= 1
        else:
            return None
        if _is_identity(q):
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
        if _is_identity(q):
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
    if not _is_identity(q):
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
