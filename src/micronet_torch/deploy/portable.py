"""The portable deploy form: a MicroNet graph built only from operators every deployment runtime runs fast.

``convert_to_deploy(model, backend="portable")`` (``convert``) builds it from ``portable_features`` here. It
reuses the deploy IR (``lower``: BatchNorm folded into the convs) but keeps each Dynamic Shift-Max in its
logical channel order, so its group-circular shift is a few channel rolls (two slices and a concatenation
each) whose 0/1 masks are folded into the coefficients, instead of a gather (``index_select`` / ONNX
``Gather``, which XNNPACK, LiteRT and ncnn cannot run in-graph). Channel shuffles are moved into convolution
weights where that is exact, absorbed by densifying a small grouped conv, or kept as the 4-D reshape ->
transpose -> reshape every runtime knows. Means keep their dimensions, the max over the K fusions is an
elementwise maximum, and no tensor has more than 4 dimensions. Exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.shuffle import compose_permutations, shuffle_permutation
from .fusions import expand_multipliers, fold_shift_max_scale, merge_separable
from .ir import Conv, Op, Perm, Pointwise, ShiftMax
from .lower import lower
from .modules import DeployMicroNet, _conv_module, nest_residuals
from .permutations import _is_identity, conv_input_perm, conv_output_perm
from .portable_fused import PortableFusedShiftMax

__all__ = [
    "PORTABLE_OPTIONS",
    "RUNTIME_OPTIONS",
    "ChannelShuffle4d",
    "ChannelSlices",
    "ConvShiftMax",
    "PortableMicroNet",
    "PortableShiftMax",
    "TwinConvShiftMax",
    "channel_runs",
    "densify_shuffles",
    "portable_features",
    "portable_ops",
]


def channel_runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """``x[:, index]`` as maximal ranges of consecutive source channels: [(start, stop), ...]."""
    idx = [int(i) for i in index]
    runs: list[tuple[int, int]] = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            runs.append((start, prev + 1))
            start = i
        prev = i
    runs.append((start, prev + 1))
    return runs


def block_shuffle(index: torch.Tensor) -> tuple[int, int] | None:
    """The (groups, block) for which ``index`` is the channel shuffle of ``groups`` groups of ``block``-channel
    blocks (block 1: a plain shuffle), or None. MicroNet's stems shuffle blocks of 4 channels."""
    c = index.numel()
    for block in range(1, c // 2 + 1):
        if c % block:
            continue
        n = c // block
        for g in range(2, n):
            if n % g == 0:
                blocks = shuffle_permutation(n, g).view(-1, 1) * block + torch.arange(block).view(1, -1)
                if torch.equal(index, blocks.reshape(-1)):
                    return g, block
    return None


class ChannelSlices(nn.Module):
    """A fixed channel selection as slices of channel ranges and one concatenation (no gather)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.runs = channel_runs(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.runs) == 1:
            a, b = self.runs[0]
            return x if (a, b) == (0, x.shape[1]) else x[:, a:b]
        return torch.cat([x[:, a:b] for a, b in self.runs], dim=1)

    def extra_repr(self) -> str:
        return f"runs={len(self.runs)}"


class ChannelShuffle4d(nn.Module):
    """A channel shuffle of ``groups`` groups of ``block``-channel blocks as reshape (N, g, C/(g block),
    block H W) -> transpose -> reshape: 4-D only, one transpose in every runtime instead of a slice per run."""

    def __init__(self, groups: int, block: int = 1) -> None:
        super().__init__()
        self.groups, self.block = groups, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g, b = self.groups, self.block
        return x.reshape(n, g, c // (g * b), b * h * w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}" + (f", block={self.block}" if self.block > 1 else "")


def _perm_module(index: torch.Tensor, block_shuffles: bool = True) -> nn.Module:
    """The cheaper gather-free form of a fixed permutation: a 4-D shuffle if it is one (of channel blocks too
    unless ``block_shuffles`` is off), else channel slices (also for a shuffle of two runs: one roll)."""
    shuffle = block_shuffle(index)
    if shuffle is not None and (block_shuffles or shuffle[1] == 1) and len(channel_runs(index)) > 2:
        return ChannelShuffle4d(*shuffle)
    return ChannelSlices(index)


class PortableShiftMax(nn.Module):
    """Dynamic Shift-Max from standard operators: mean (keepdim) -> 1x1 conv -> ReLU -> 1x1 conv -> clamp/h-sigmoid
    (+ offset) -> per-(k, j) coefficient slices -> multiply-adds with the sliced shift -> elementwise maximum."""

    def __init__(self, op: ShiftMax, dtype: torch.dtype = torch.float32, shifted_input: bool = False) -> None:
        super().__init__()
        if not (_is_identity(op.in_perm) and _is_identity(op.out_perm)):
            raise ValueError("the portable form keeps Dynamic Shift-Max in its logical channel order")
        c, k, j = op.channels, op.k, op.j
        self.channels, self.k, self.j, self.scaled = c, k, j, op.scaled
        # shifted_input: forward(x, x_shifted) gets the shifted map from its producer (TwinConvShiftMax)
        self.shifted_input = shifted_input and j == 2
        self.lo, self.hi = op.lo, op.hi
        w2, b2, offset = op.w2, op.b2, op.offset  # rows in the published (k, j, c) order: contiguous C blocks
        if self.scaled:  # coef / s = hsig(v) - 0.5 + offset / s (the next conv carries s)
            w2, b2 = w2 * (6.0 / op.scale), b2 * (6.0 / op.scale)
            offset = offset / op.scale - 0.5
        self.fc1 = nn.Conv2d(c, op.w1.shape[0], 1)
        with torch.no_grad():
            self.fc1.weight.copy_(op.w1.to(dtype).view(*op.w1.shape, 1, 1))
            self.fc1.bias.copy_(op.b1.to(dtype))
        self.rolls: list[int] = []
        if self.shifted_input:  # rows a_k0 for each k, then a_k1 for each k
            kj = torch.arange(k * j * c).view(k, j, c)
            rows = torch.cat([kj[kk, 0] for kk in range(k)] + [kj[kk, 1] for kk in range(k)])
            w2, b2, offset = w2[rows], b2[rows], offset[rows]
            self.mask = None
        elif j == 2:
            # shift(x)[i] = x[i + d_i mod C] takes only a few distinct d (published shift: S + 1, and 1 at each
            # group's last channel): the shift is sum_d roll_d(x) * mask_d, and each 0/1 mask is folded into the
            # shift's coefficients, so no channel is gathered and every term but one per channel is an exact 0
            d = (op.shift - torch.arange(c)) % c
            self.rolls = sorted(set(d.tolist()))
            masks = torch.stack([(d == r).double() for r in self.rolls])  # (R, C)
            kj = torch.arange(k * j * c).view(k, j, c)
            rows = torch.cat([kj[kk, 0] for kk in range(k)] + [kj[kk, 1] for kk in range(k) for _ in self.rolls])
            mult = torch.cat(
                [torch.ones(k * c, dtype=torch.float64)] + [masks[r] for _ in range(k) for r in range(len(self.rolls))]
            )
            w2, b2, offset = w2[rows], b2[rows], offset[rows]  # a_k0 for each k, then a_k1 once per roll
            self.register_buffer("mask", mult.to(dtype).view(1, -1, 1, 1).clone())
        else:
            self.mask = None
        self.fc2 = nn.Conv2d(op.w1.shape[0], w2.shape[0], 1)
        with torch.no_grad():
            self.fc2.weight.copy_(w2.to(dtype).view(*w2.shape, 1, 1))
            self.fc2.bias.copy_(b2.to(dtype))
        self.register_buffer("offset", offset.to(dtype).view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor, x_shifted: torch.Tensor | None = None) -> torch.Tensor:
        c, k = self.channels, self.k
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        coef = (F.hardsigmoid(z) if self.scaled else torch.clamp(z, self.lo, self.hi)) + self.offset
        if self.mask is not None:
            coef = coef * self.mask
        a = [coef[:, i * c : (i + 1) * c] for i in range(coef.shape[1] // c)]  # each (N, C, 1, 1)
        if self.shifted_input:
            if x_shifted is None:
                raise ValueError("this Dynamic Shift-Max takes its shifted input from its TwinConvShiftMax")
            rolled = [x_shifted]
        else:
            rolled = [x if d == 0 else torch.cat([x[:, d:], x[:, :d]], dim=1) for d in self.rolls]
        out = None
        for kk in range(k):
            y = x * a[kk]
            for r, xr in enumerate(rolled):
                y = y + xr * a[k + kk * len(rolled) + r]
            out = y if out is None else torch.maximum(out, y)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, K={self.k}, J={self.j}, scaled={self.scaled}"


@dataclass
class ConvShiftMax:
    """A dense convolution whose only consumer is a Dynamic Shift-Max: built as a ``TwinConvShiftMax``."""

    conv: Conv
    shift_max: ShiftMax


def _shifted_rows(conv: Conv, index: torch.Tensor) -> Conv:
    """The conv whose output channel i is output channel ``index[i]`` of ``conv`` (its rows permuted: exact)."""
    edge = None if conv.edge is None else conv.edge[index]
    return Conv(conv.weight[index], conv.bias[index], conv.stride, conv.padding, conv.groups, edge)


class TwinConvShiftMax(nn.Module):
    """A dense conv and its Dynamic Shift-Max, with the group-circular shift folded into a second conv.

    The shifted map ``x[:, shift]`` is the same conv with its output rows in shift order, so a twin conv reads
    the same input and emits it directly: no channel roll, no mask, one product per fusion less. Measured
    faster than the rolls in OpenVINO, LiteRT, ExecuTorch and ncnn (docs/benchmarks.md).
    """

    def __init__(self, op: ConvShiftMax, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = _conv_module(op.conv, dtype)
        self.conv_shifted = _conv_module(_shifted_rows(op.conv, op.shift_max.shift), dtype)
        self.shift_max = PortableShiftMax(op.shift_max, dtype, shifted_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift_max(self.conv(x), self.conv_shifted(x))


def pair_shift_convs(ops: list[Op]) -> list[Op | ConvShiftMax]:
    """Pair each 1 x 1 dense conv with the Dynamic Shift-Max (J = 2) that directly follows it.

    Only a dense conv can emit any row order; a grouped one would have to read other groups for the shifted
    rows, and a k x k one would double a costlier conv.
    """
    out: list[Op | ConvShiftMax] = []
    i = 0
    while i < len(ops):
        op, nxt = ops[i], ops[i + 1] if i + 1 < len(ops) else None
        if (
            isinstance(op, Conv)
            and op.groups == 1
            and op.weight.shape[2:] == (1, 1)
            and isinstance(nxt, ShiftMax)
            and nxt.j == 2
            and _is_identity(nxt.in_perm)
            and _is_identity(nxt.out_perm)
        ):
            out.append(ConvShiftMax(op, nxt))
            i += 2
            continue
        out.append(op)
        i += 1
    return out


def _fold_perms_into_convs(ops: list[Op]) -> list[Op]:
    """Move each channel permutation into a neighbouring convolution's weights where that is exact.

    Unlike ``deploy.optimize`` a permutation never enters a Dynamic Shift-Max (that would scatter its channel
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
            if moved is not None and _is_identity(moved[1]):
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
                if _is_identity(q):
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
        if _is_identity(op.index):
            del ops[i]
            continue
        i += 1
    return ops


def _roll_count(shift: torch.Tensor) -> int:
    """How many channel rolls the portable form needs for this shift (its distinct channel offsets)."""
    return len(set(((shift - torch.arange(shift.numel())) % shift.numel()).tolist()))


def move_perms_past_shift_max(ops: list[Op]) -> list[Op]:
    """Move a channel permutation from before a Dynamic Shift-Max to after it where that needs no more rolls.

    ``DSM(t[:, P]) = DSM'(t)[:, P]`` for the DSM' that runs in t's channel order: shift ``P[S[P^-1]]``, its
    hyper-function's input columns and coefficient rows permuted by ``P^-1`` (exact). After it the permutation
    moves into the next dense conv's input columns (``_fold_perms_into_convs``), so an explicit shuffle goes.
    """
    ops = list(ops)
    for i in range(1, len(ops) - 1):
        perm, op, nxt = ops[i - 1], ops[i], ops[i + 1]
        if not (isinstance(perm, Perm) and isinstance(op, ShiftMax) and op.j == 2):
            continue
        if not (_is_identity(op.in_perm) and _is_identity(op.out_perm)):
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


def _build(
    ops: list[Op | ConvShiftMax], dtype: torch.dtype, block_shuffles: bool = True, fused_ops: bool = False
) -> nn.Sequential:
    def make(op: Op) -> nn.Module:
        if isinstance(op, Conv):
            return _conv_module(op, dtype)
        if isinstance(op, Perm):
            return _perm_module(op.index, block_shuffles)
        if isinstance(op, ShiftMax):
            return PortableFusedShiftMax(op, dtype) if fused_ops else PortableShiftMax(op, dtype)
        if isinstance(op, ConvShiftMax):
            return TwinConvShiftMax(op, dtype)
        return op.module

    return nest_residuals(ops, make)


class PortableMicroNet(DeployMicroNet):
    """Inference-only MicroNet in portable operators: ``features``, then a keepdim mean, flatten and the head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.features(x)).mean((2, 3), keepdim=True)
        return self.head(torch.flatten(x, 1))


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


def portable_ops(
    model: nn.Module,
    scale_into_conv: bool = True,
    densify: int = 8,
    merge: str = "none",
    expand: int = 0,
    move_perms: bool = True,
) -> list[Op]:
    """The flat operation list of the portable form (BN folded, permutations in convs where exact, and shuffles
    next to grouped convs of at most ``densify`` groups absorbed by making those convs dense; 0: never).

    ``merge`` merges factorized k x 1 / 1 x k pairs (``deploy.merge_separable``): "none", "stem", "plain" or
    "all"; ``expand`` turns channel-multiplier depthwise convs whose producer has at most that many outputs into
    plain depthwise ones (``deploy.expand_multipliers``).
    """
    ops = lower(model)
    if densify:
        ops = densify_shuffles(ops, densify)
    ops = _fold_perms_into_convs(ops)
    if expand:
        ops = _fold_perms_into_convs(expand_multipliers(ops, expand))
    if merge != "none":
        ops = merge_separable(ops, plain_only=merge in ("stem", "plain"), stem_only=merge == "stem")
    if move_perms:
        ops = _fold_perms_into_convs(move_perms_past_shift_max(ops))
    return fold_shift_max_scale(ops) if scale_into_conv else ops


# the keywords portable_features takes
PORTABLE_OPTIONS = ("scale_into_conv", "densify", "merge", "expand", "twin_conv", "move_perms", "block_shuffles")


def portable_features(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    scale_into_conv: bool = True,
    densify: int = 8,
    merge: str = "none",
    expand: int = 0,
    twin_conv: bool = True,
    move_perms: bool = True,
    block_shuffles: bool = True,
    fused_ops: bool = False,
) -> nn.Sequential:
    """The feature extractor of an eval-mode MicroNet in portable modules (``portable_ops`` for the options).

    ``scale_into_conv`` lets the convolution after each Dynamic Shift-Max carry the hyper-function's scale
    (``fusions.fold_shift_max_scale``), so the coefficients are one h-sigmoid plus an offset; ``twin_conv``
    computes the shift of each Dynamic Shift-Max fed by a dense 1 x 1 conv as a twin of that conv
    (``TwinConvShiftMax``) instead of channel rolls; ``move_perms`` moves a shuffle before a Dynamic Shift-Max
    past it into the next conv where that needs no more rolls (``move_perms_past_shift_max``);
    ``block_shuffles`` writes a shuffle of channel blocks (M0-M3's stems) as one 4-D transpose, not slices;
    ``fused_ops`` computes each Dynamic Shift-Max's fusion and max with one ``micronet::shift_max`` call
    (``PortableFusedShiftMax``, ExecuTorch's kernel) instead of standard operators (no twin convs then).
    """
    if merge not in ("none", "stem", "plain", "all"):
        raise ValueError(f"merge={merge!r}: choose none, stem, plain or all")
    ops = portable_ops(model, scale_into_conv, densify, merge, expand, move_perms)
    paired = pair_shift_convs(ops) if twin_conv and not fused_ops else list(ops)
    return _build(paired, dtype, block_shuffles, fused_ops)


# the portable options each runtime measured fastest with (M0 and M3 at 224^2, 1 thread, docs/benchmarks.md): merging
# the factorized pairs helps every runtime of the portable form (ExecuTorch since the twin convs: M0 0.967 vs 1.092
# ms, M3 4.073 vs 4.409); ncnn runs a block shuffle's reshapes slower than the slices (M3 6.53 vs 6.15 ms)
RUNTIME_OPTIONS: dict[str, dict[str, object]] = {
    "onnx": {},
    "openvino": {"merge": "all"},
    "executorch": {"merge": "all"},
    "litert": {"merge": "all"},
    "ncnn": {"merge": "all", "block_shuffles": False},
}
