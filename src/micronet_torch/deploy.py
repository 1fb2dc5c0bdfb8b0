"""Deploy mode: an inference-only MicroNet with the same outputs and far fewer, cheaper operators.

``convert_to_deploy(model)`` turns an eval-mode ``MicroNet`` into a ``DeployMicroNet``: BatchNorm folded
into the convolutions and linears, every channel shuffle composed with its neighbours and folded into
convolution weights or into a Dynamic Shift-Max's single gather, and each Dynamic Shift-Max reduced to
pool -> Linear -> ReLU -> Linear -> clamp -> one gather -> one batched product (-> one max), and each
factorized k x 1 / 1 x k convolution pair merged into one k x k convolution with a border correction. Every
rewrite is exact up to float rounding; ``docs/deploy.md`` says why, rewrite by rewrite.

The conversion goes through a flat list of simple operations (``Conv``, ``Perm``, ``ShiftMax``, ...),
on which two passes move each channel permutation to where it costs nothing, then builds modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import MicroBlock, SwishLinear
from .fused_ops import shift_max
from .ops import ChannelShuffle, DynamicShiftMax, invert_permutation
from .ops.shuffle import compose_permutations

__all__ = [
    "DeployMicroNet",
    "FusedShiftMax",
    "PhaseStemConv",
    "ResidualSequence",
    "convert_to_deploy",
    "deploy_summary",
]

# ---- the flat intermediate representation -------------------------------------------------------
# Weights are kept in float64 while they are folded and permuted, and cast once when modules are built.


@dataclass
class Conv:
    """A convolution with its BatchNorm folded in (weight (C_out, C_in/groups, kh, kw), bias (C_out))."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    # set by ``merge_separable``: (C_out, kw) terms -b1 * w2[o, j] to add where tap j reads the zero padding
    # of the merged pair's intermediate (the left / right border columns); see ``EdgeCorrectedConv``
    edge: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class Perm:
    """A channel permutation: ``out = x[:, index]``."""

    index: torch.Tensor


@dataclass
class Pointwise:
    """A channel-independent activation (ReLU6, h-swish, ...): commutes with every permutation."""

    module: nn.Module


@dataclass
class Opaque:
    """Any other module, kept as it is; no permutation moves across it."""

    module: nn.Module


@dataclass
class Save:
    """Start of a residual block: remember the input."""


@dataclass
class Add:
    """End of a residual block: add the remembered input."""


@dataclass
class ShiftMax:
    """Dynamic Shift-Max in logical channel order, with an input and an output permutation around it.

    Computes ``y[:, out_perm]`` where ``y = DSM(x)`` and ``x = t[:, in_perm]`` for the actual input t.
    ``w2``/``b2`` already hold the hyper-function's scale, so the coefficients are
    ``clamp(w2 @ relu(w1 @ mean(x) + b1) + b2, lo, hi) + offset`` (rows in the published order k, j, c).
    ``out_perm`` may repeat channels (a selection): the activation then also feeds a channel multiplier.
    """

    channels: int
    k: int
    j: int
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    offset: torch.Tensor
    lo: float
    hi: float
    shift: torch.Tensor
    in_perm: torch.Tensor = field(default=None)  # type: ignore[assignment]
    out_perm: torch.Tensor = field(default=None)  # type: ignore[assignment]
    # set when the next convolution has absorbed the factor ``scale``: the module then outputs y / scale
    scaled: bool = False
    scale: float = 4.0

    def __post_init__(self) -> None:
        if self.in_perm is None:
            self.in_perm = torch.arange(self.channels)
        if self.out_perm is None:
            self.out_perm = torch.arange(self.channels)


@dataclass
class PhaseStem:
    """A dense 3 x 3 stride-2 conv, a pointwise activation and a depthwise 3 x 3 stride-2 conv, to be computed
    on the 2 x 2 phases of the first conv's output (``phase_stem``)."""

    a: Conv
    act: nn.Module
    b: Conv


Op = Conv | Perm | Pointwise | Opaque | Save | Add | ShiftMax | PhaseStem


# ---- lowering the eager model to the flat list --------------------------------------------------
def _fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm):
    """BN(W x + b) = (s W) x + s (b - mean) + beta with s = gamma / sqrt(var + eps), in float64."""
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale.view(-1, *([1] * (w.dim() - 1))), (b - mean) * scale + beta


def _conv_op(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> Conv:
    if not isinstance(conv.padding, tuple) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise NotImplementedError(f"deploy mode supports plain zero-padded convolutions; got {conv}")
    if bn is None:
        w = conv.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    else:
        w, b = _fold_bn(conv.weight, conv.bias, bn)
    return Conv(w, b, tuple(conv.stride), tuple(conv.padding), conv.groups)


def _shift_max_op(m: DynamicShiftMax) -> ShiftMax:
    """Fold the hyper-function's h-sigmoid affine: (hsig(v) - 0.5) * s = clamp(v * s / 6, -s/2, s/2)."""
    fc1, fc2 = m.fc[0], m.fc[2]
    if not (isinstance(m.fc[1], nn.ReLU) and isinstance(m.fc[3], nn.Hardsigmoid)):
        raise NotImplementedError(f"unexpected Dynamic Shift-Max hyper-function {m.fc}")
    s = float(m.scale)
    return ShiftMax(
        channels=m.channels,
        k=m.k,
        j=m.j,
        w1=fc1.weight.detach().double(),
        b1=fc1.bias.detach().double(),
        w2=fc2.weight.detach().double() * (s / 6.0),
        b2=fc2.bias.detach().double() * (s / 6.0),
        offset=m.offset.double().clone(),
        lo=-s / 2.0,
        hi=s / 2.0,
        shift=m.index.clone() if m.j == 2 else torch.arange(m.channels),
        scale=s,
    )


def _lower(module: nn.Module, channels: int, ops: list[Op]) -> int:
    """Append ``module``'s operations to ``ops``; return the channel count after it."""
    if isinstance(module, nn.Sequential):
        children = list(module)
        i = 0
        while i < len(children):
            child = children[i]
            if isinstance(child, nn.Conv2d):
                bn = children[i + 1] if i + 1 < len(children) else None
                if isinstance(bn, nn.BatchNorm2d):
                    ops.append(_conv_op(child, bn))
                    i += 2
                else:
                    ops.append(_conv_op(child, None))
                    i += 1
                channels = child.out_channels
                continue
            channels = _lower(child, channels, ops)
            i += 1
        return channels
    if isinstance(module, MicroBlock):
        if module.use_residual:
            ops.append(Save())
        channels = _lower(module.layers, channels, ops)
        if module.use_residual:
            ops.append(Add())
        return channels
    if isinstance(module, ChannelShuffle):
        if module.groups > 1:
            ops.append(Perm(module.permutation(channels)))
        return channels
    if isinstance(module, DynamicShiftMax):
        ops.append(_shift_max_op(module))
        return channels
    if isinstance(module, nn.Identity | nn.Dropout):
        return channels
    if isinstance(module, nn.ReLU | nn.ReLU6 | nn.Hardswish | nn.Hardsigmoid | nn.Hardtanh):
        act = copy.deepcopy(module)
        if hasattr(act, "inplace"):
            act.inplace = False  # a residual block must not overwrite its input
        ops.append(Pointwise(act))
        return channels
    if hasattr(module, "conv") and isinstance(module.conv, nn.Sequential) and len(list(module.children())) == 1:
        # GroupConvBN, MicroFactorizedDepthwise, DepthwiseConvBN, SpatialSeparableStem: a conv/BN sequence
        return _lower(module.conv, channels, ops)
    if hasattr(module, "stem") and isinstance(module.stem, nn.Sequential):
        return _lower(module.stem, channels, ops)
    ops.append(Opaque(copy.deepcopy(module)))
    return channels


# ---- moving permutations ------------------------------------------------------------------------
def _is_identity(index: torch.Tensor) -> bool:
    return bool(torch.equal(index, torch.arange(index.numel())))


def _conv_output_perm(conv: Conv, q: torch.Tensor) -> tuple[Conv, torch.Tensor] | None:
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


def _conv_input_perm(conv: Conv, q: torch.Tensor) -> tuple[Conv, torch.Tensor] | None:
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
            moved = _conv_output_perm(op, q)
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
            moved = _conv_input_perm(op, q)
            if moved is None:
                break
            ops[j], q = moved
            j += 1
        else:
            break
    if not _is_identity(q):
        ops.insert(j, Perm(q))
    return ops


# ONNX Runtime's blocked (NCHWc) layout: channels in blocks of this many (AVX-512); a depthwise conv runs there
# only with a multiple of it
NCHWC_BLOCK = 16


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


def _is_row_conv(op: Op) -> bool:
    """A 1 x k conv (stride and padding along the width only) with one input per group and no border map."""
    return _is_1d_conv(op, 0) and op.groups == op.in_channels


def _separable_pair(a: Op, b: Op) -> bool:
    """``a`` a k x 1 conv and ``b`` a 1 x k conv with one input per group reading it (stride along its own axis)."""
    return _is_1d_conv(a, 1) and _is_row_conv(b) and b.in_channels == a.out_channels


def merge_separable(ops: list[Op], plain_only: bool = False, stem_only: bool = False) -> list[Op]:
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
    """
    out: list[Op] = []
    i = 0
    while i < len(ops):
        if (
            i + 1 < len(ops)
            and _separable_pair(ops[i], ops[i + 1])
            and (not plain_only or ops[i].groups in (1, ops[i + 1].out_channels))
            and (not stem_only or ops[i].groups == 1 or _after_merged_stem(out, ops[i + 1]))
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


# ---- deploy-mode modules --------------------------------------------------------------------------
class ChannelGather(nn.Module):
    """A fixed channel permutation as one ``index_select`` (an ONNX Gather)."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 1, self.index)


# the batched-product form of Dynamic Shift-Max pays off when H * W >= this many times C (measured in ORT)
MATMUL_MIN_PIXELS_PER_CHANNEL = 4


class FusedShiftMax(nn.Module):
    """Dynamic Shift-Max as pool -> Linear -> ReLU -> Linear -> clamp (+ offset) -> gather -> product -> max.

    One gather reads x and its shift (and any channel permutation folded into them) interleaved as
    (N, C, J, HW); the coefficients are laid out as (N, C, K, J), so a single batched matmul gives
    every (k, c) fusion sum_j a_kj x_j, and a max over K finishes the activation. When ``scaled``, the
    coefficients are divided by the hyper-function's scale (h-sigmoid + offset, one fused Gemm in ONNX
    Runtime) and the next convolution's weights carry the factor instead.
    """

    def __init__(
        self, op: ShiftMax, dtype: torch.dtype = torch.float32, use_matmul: bool = True, fused_op: bool = False
    ) -> None:
        super().__init__()
        c, k, j = op.channels, op.k, op.j
        self.use_matmul = use_matmul  # ONNX Runtime: yes on large maps; PyTorch eager: never (slow bmm)
        self.fused_op = fused_op  # one micronet.ShiftMax operator (fused_ops.py) for the gather, products and max
        logical = op.out_perm  # actual output channel a is logical channel out_perm[a] (may repeat)
        self.in_channels, self.out_channels, self.k, self.j = c, logical.numel(), k, j
        self.scaled = op.scaled
        self.lo, self.hi = op.lo, op.hi
        inv_in = invert_permutation(op.in_perm)
        self.fc1 = nn.Linear(c, op.w1.shape[0])
        self.fc2 = nn.Linear(op.w1.shape[0], self.out_channels * k * j)
        # coefficient rows in (a, k, j) order (published order is (k, j, c): a1, b1, a2, b2 blocks), so the
        # coefficients reshape to (N, C, K, J) for the batched product without a transpose
        kj = torch.tensor([kk * j * c + jj * c for kk in range(k) for jj in range(j)])
        rows = (logical.view(-1, 1) + kj.view(1, -1)).reshape(-1)
        w2, b2, offset = op.w2[rows], op.b2[rows], op.offset[rows]
        if self.scaled:  # coef / s = hsig(v) - 0.5 + offset / s, with v the original Linear output
            w2, b2 = w2 * (6.0 / op.scale), b2 * (6.0 / op.scale)
            offset = offset / op.scale - 0.5
        with torch.no_grad():
            self.fc1.weight.copy_(op.w1[:, inv_in].to(dtype))  # pooled actual channel t -> logical column
            self.fc1.bias.copy_(op.b1.to(dtype))
            self.fc2.weight.copy_(w2.to(dtype))
            self.fc2.bias.copy_(b2.to(dtype))
        self.register_buffer("offset", offset.to(dtype).clone())
        x_src = op.in_perm[logical]
        self.needs_gather = not _is_identity(x_src)
        self.register_buffer("x_index", x_src.long())  # the (permuted) input itself
        if j == 2:
            shift_src = op.in_perm[op.shift[logical]]
            self.register_buffer("shift_index", shift_src.long())  # its shift
            self.register_buffer("pair_index", torch.stack([x_src, shift_src], dim=1).reshape(-1).long())
        # the fused operator's attribute: the input channels each output channel reads, (x, shift) per channel
        self.fused_index = (self.pair_index if j == 2 else self.x_index).tolist()

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The fused coefficients, (N, C_out * K * J) in (c, k, j) order (divided by the scale if ``scaled``)."""
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        if self.scaled:
            return F.hardsigmoid(z) + self.offset
        return torch.clamp(z, self.lo, self.hi) + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        c, k, j = self.out_channels, self.k, self.j
        coef = self.coefficients(x)
        if self.fused_op:
            return shift_max(x, coef, self.fused_index, k, j)
        if j == 2 and self.use_matmul and h * w >= MATMUL_MIN_PIXELS_PER_CHANNEL * c:
            # large maps, few channels: one gather of (x, shift) pairs and one batched product
            u = torch.index_select(x, 1, self.pair_index).reshape(-1, c, 2, h * w)
            coef = coef.view(-1, c, k, 2)  # (N, C, K, J)
            y = torch.matmul(coef, u)  # (N, C, K, HW)
            y = torch.amax(y, dim=2) if k == 2 else y
            return y.reshape(-1, c, h, w)
        # small maps, many channels: broadcast products (cheaper than many tiny matrix products)
        xs = torch.index_select(x, 1, self.x_index) if self.needs_gather else x
        parts = coef.view(-1, c, k * j, 1).split(1, dim=2)  # each (N, C, 1, 1)
        if j == 2:
            shifted = torch.index_select(x, 1, self.shift_index)
            y = torch.addcmul(xs * parts[0], shifted, parts[1])
            if k == 2:
                y = torch.maximum(y, torch.addcmul(xs * parts[2], shifted, parts[3]))
            return y
        y = xs * parts[0]
        return torch.maximum(y, xs * parts[1]) if k == 2 else y

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, K={self.k}, J={self.j}, "
            f"scaled={self.scaled}, fused_op={self.fused_op}"
        )


class ResidualSequence(nn.Sequential):
    """A residual block's deploy operations: ``x + layers(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self:
            out = layer(out)
        return out + x


class EdgeCorrectedConv(nn.Conv2d):
    """A merged k x k conv (``merge_separable``) plus its border correction, a constant map.

    The map depends only on the input size (Python ints while tracing, so it exports as a constant). With
    ``full_map`` it is stored at the output's full (1, C, H_out, W_out) size: ONNX Runtime adds two tensors
    of one shape in a single pass, but broadcasting a (1, C, 1, W_out) map over the rows is several times
    slower (M0 with trained-like weights: 0.526 -> 0.475 ms); PyTorch broadcasts it cheaply, so eager keeps
    the small map.
    """

    def __init__(self, *args, edge: torch.Tensor, full_map: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("edge", edge.clone())
        self.full_map = full_map
        self._maps: dict[tuple, torch.Tensor] = {}

    def edge_map(self, width: int, out_height: int = 1) -> torch.Tensor:
        """The correction for an input ``width`` wide: (1, C, 1, W_out), or (1, C, out_height, W_out) if full."""
        rows = out_height if self.full_map else 1
        key = (width, rows, self.edge.device, self.edge.dtype)
        if key not in self._maps:
            emap = _edge_map(self.edge, width, self.stride[1], self.padding[1])  # (C, W_out)
            self._maps[key] = _rows(emap.view(1, emap.shape[0], 1, emap.shape[1]), rows)
        return self._maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + self.edge_map(x.shape[3], y.shape[2])


def _rows(emap: torch.Tensor, rows: int) -> torch.Tensor:
    """A (1, C, 1, W) border map repeated to ``rows`` rows (a plain copy, so it exports as one constant)."""
    return emap if rows == 1 else emap.expand(-1, -1, rows, -1).contiguous()


def _edge_map(edge: torch.Tensor, width: int, stride: int, padding: int) -> torch.Tensor:
    """(C, W_out): the border correction of a merged pair at each output column (``EdgeCorrectedConv``)."""
    kw = edge.shape[1]
    w_out = (width + 2 * padding - kw) // stride + 1
    col = torch.arange(w_out).view(-1, 1) * stride + torch.arange(kw).view(1, -1) - padding  # (W_out, kw)
    outside = ((col < 0) | (col >= width)).to(torch.float64)
    return (edge.double() @ outside.T).to(edge.dtype)


# tap k of a stride-2, pad-1, 3-tap window on the phase grid: (phase, cell offset + 1) for k = 0, 1, 2
_PHASE_TAP = ((1, 0), (0, 1), (1, 1))


class PhaseStemConv(nn.Module):
    """conv A (dense 3 x 3, stride 2) -> activation -> conv B (depthwise 3 x 3, stride 2), computed on phases.

    A's output row 2i + p, column 2j + q is channel (c, p, q) at (i, j) of one 5 x 5 stride-4 conv on the input,
    so A runs at a quarter of its resolution with 4x the channels, and only on its distinct channels (the
    ONNX layout repeats them for B): ONNX Runtime then computes 16 channels of real work instead of 16 lanes
    holding 4 repeated channels. B reads, for taps 0, 1, 2 of a window, phase 1 of the previous cell, phase 0
    and phase 1 of its own cell: a dense 2 x 2 conv over the phases, padded by one cell at the top and left.
    Exact when the input's height and width are multiples of 4; other sizes take the plain A -> act -> B path.
    """

    def __init__(self, op: PhaseStem, dtype: torch.dtype = torch.float32, full_maps: bool = False) -> None:
        super().__init__()
        a, b = op.a, op.b
        self.full_maps = full_maps  # border maps at full size (one-pass Add in ONNX Runtime, EdgeCorrectedConv)
        self.plain = nn.Sequential(_conv_module(a, dtype, full_maps), op.act, _conv_module(b, dtype, full_maps))
        self.act = op.act
        # A's distinct output channels (the ONNX layout repeats them): base[c] is channel c's distinct row
        edge_a = a.edge if a.edge is not None else torch.zeros(a.out_channels, 3, dtype=a.weight.dtype)
        rows = torch.cat([a.weight.flatten(1), a.bias.view(-1, 1), edge_a], dim=1)
        distinct, base = torch.unique(rows, dim=0, return_inverse=True)
        first = torch.tensor([int((base == u).nonzero()[0]) for u in range(len(distinct))])
        n, cin = len(distinct), a.in_channels
        wa = torch.zeros(4 * n, cin, 5, 5, dtype=a.weight.dtype)
        for p in range(2):
            for q in range(2):
                wa[p * 2 + q :: 4, :, 2 * p : 2 * p + 3, 2 * q : 2 * q + 3] = a.weight[first]
        wb = torch.zeros(b.out_channels, 4 * n, 2, 2, dtype=b.weight.dtype)
        for o in range(b.out_channels):
            for ky, (p, ry) in enumerate(_PHASE_TAP):
                for kx, (q, rx) in enumerate(_PHASE_TAP):
                    wb[o, int(base[o]) * 4 + p * 2 + q, ry, rx] += b.weight[o, 0, ky, kx]
        self.register_buffer("wa", wa.to(dtype))
        self.register_buffer("ba", a.bias[first].repeat_interleave(4).to(dtype))
        self.register_buffer("wb", wb.to(dtype))
        self.register_buffer("bb", b.bias.to(dtype))
        self.register_buffer("edge_a", edge_a[first].to(dtype))
        self.register_buffer("edge_b", (b.edge if b.edge is not None else torch.zeros(b.out_channels, 3)).to(dtype))
        self._maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def edge_maps(self, width: int, height: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Constant border corrections at input size ``height`` x ``width``: A's on the phase grid, B's on its output
        (both with one row, or at their maps' full height if ``full_maps``)."""
        rows = height // 4 if self.full_maps else 1
        key = (width, rows, self.wa.device, self.wa.dtype)
        if key not in self._maps:
            emap_a = _edge_map(self.edge_a, width, 2, 1)  # (n, width / 2), column 2j + q
            phases = emap_a.view(-1, 1, width // 4, 2).permute(0, 1, 3, 2)  # (n, 1, q, j)
            phases = phases.unsqueeze(1).expand(-1, 2, -1, -1, -1)  # (n, p, 1, q, j)
            emap_a = phases.reshape(-1, 1, width // 4)
            emap_b = _edge_map(self.edge_b, width // 2, 2, 1)
            self._maps[key] = (_rows(emap_a.unsqueeze(0), rows), _rows(emap_b.view(1, -1, 1, width // 4), rows))
        return self._maps[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        if h % 4 or w % 4:
            return self.plain(x)
        emap_a, emap_b = self.edge_maps(w, h)
        y = self.act(F.conv2d(x, self.wa, self.ba, stride=4, padding=1) + emap_a)
        return F.conv2d(F.pad(y, (1, 0, 1, 0)), self.wb, self.bb) + emap_b


def _rows_foldable(op: Conv) -> bool:
    """A row conv (any multiplier) that ONNX Runtime would not already run in its blocked layout."""
    return _is_row_conv(op) and not (op.out_channels == op.in_channels and op.in_channels % NCHWC_BLOCK == 0)


class RowFoldedConv(nn.Conv2d):
    """A 1 x k conv with one input per group and m outputs per group, run with the rows folded into channels.

    A horizontal conv never mixes rows, so (N, C, H, W) viewed as (N, C * H, 1, W) is the same conv with
    each channel's weights repeated for its H rows. Output r of each group is then one depthwise conv over
    C * H channels, which ONNX Runtime runs in its blocked layout when C * H is a multiple of 16; its
    per-group path for a channel multiplier is several times slower (M3's first block, 24 -> 48 channels
    at 56 x 112: 108 -> 80 us). The m results are interleaved back to the original channel order. Other
    sizes, and TorchScript tracing (whose ONNX exporter cannot infer the folded shapes), run the plain
    grouped conv, decided when the graph is traced.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._folded: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def folded(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each of the m outputs per group: weight (C * rows, 1, 1, k) and bias (C * rows), channel-major."""
        key = (rows, self.weight.device, self.weight.dtype)
        if key not in self._folded:
            m = self.out_channels // self.in_channels
            w = self.weight.detach().view(self.in_channels, m, 1, 1, -1)
            b = self.bias.detach().view(self.in_channels, m)
            self._folded[key] = [
                (w[:, r].repeat_interleave(rows, 0).contiguous(), b[:, r].repeat_interleave(rows).contiguous())
                for r in range(m)
            ]
        return self._folded[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        if (c * h) % NCHWC_BLOCK or torch.jit.is_tracing():  # TorchScript / the legacy ONNX exporter: plain conv
            return super().forward(x)
        xr = x.reshape(-1, c * h, 1, w)
        w_out = (w + 2 * self.padding[1] - self.kernel_size[1]) // self.stride[1] + 1
        outs = [
            F.conv2d(xr, wr, br, (1, self.stride[1]), (0, self.padding[1]), groups=c * h).view(-1, c, 1, h, w_out)
            for wr, br in self.folded(h)
        ]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (N, C, m, H, W_out): output o = a * m + r
        return y.reshape(-1, self.out_channels, h, w_out)


def _conv_module(op: Conv, dtype: torch.dtype, full_map: bool = False, fold_rows: bool = False) -> nn.Conv2d:
    cout, cin_g, kh, kw = op.weight.shape
    args = (cin_g * op.groups, cout, (kh, kw), op.stride, op.padding)
    if fold_rows and _rows_foldable(op):
        conv = RowFoldedConv(*args, groups=op.groups, bias=True)
    elif op.edge is None:
        conv = nn.Conv2d(*args, groups=op.groups, bias=True)
    else:
        conv = EdgeCorrectedConv(*args, groups=op.groups, bias=True, edge=op.edge.to(dtype), full_map=full_map)
    with torch.no_grad():
        conv.weight.copy_(op.weight.to(dtype))
        conv.bias.copy_(op.bias.to(dtype))
    return conv


def _build(
    ops: list[Op], dtype: torch.dtype, use_matmul: bool, full_maps: bool | None = None, fused_ops: bool = False
) -> nn.Sequential:
    """Modules for ``ops``; ``use_matmul`` and ``full_maps`` (default: ``use_matmul``) pick ONNX Runtime's forms,
    ``fused_ops`` the ``micronet.ShiftMax`` operator for every Dynamic Shift-Max."""
    full_maps = use_matmul if full_maps is None else full_maps
    stack: list[list[nn.Module]] = [[]]
    for op in ops:
        if isinstance(op, Save):
            stack.append([])
        elif isinstance(op, Add):
            layers = stack.pop()
            stack[-1].append(ResidualSequence(*layers))
        elif isinstance(op, Conv):
            stack[-1].append(_conv_module(op, dtype, full_maps, fold_rows=use_matmul))
        elif isinstance(op, Perm):
            stack[-1].append(ChannelGather(op.index))
        elif isinstance(op, ShiftMax):
            stack[-1].append(FusedShiftMax(op, dtype, use_matmul, fused_ops))
        elif isinstance(op, PhaseStem):
            stack[-1].append(PhaseStemConv(op, dtype, full_maps))
        else:
            stack[-1].append(op.module)
    if len(stack) != 1:
        raise RuntimeError("unbalanced residual markers")
    return nn.Sequential(*stack[0])


def _fold_linear(unit: nn.Module, dtype: torch.dtype) -> nn.Module:
    """SwishLinear (Linear -> BN1d -> h-swish) as Linear -> h-swish with the BN folded in."""
    if not isinstance(unit, SwishLinear):
        return copy.deepcopy(unit)
    linear, bn, act = unit.linear
    w, b = _fold_bn(linear.weight, linear.bias, bn)
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        out.bias.copy_(b.to(dtype))
    return nn.Sequential(out, copy.deepcopy(act))


class DeployMicroNet(nn.Module):
    """Inference-only MicroNet: ``features`` (fused operations), ``head`` (pool, h-swish, folded linears)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.relu6(x).mean((2, 3))
        return self.head(x)

    def train(self, mode: bool = True) -> DeployMicroNet:
        if mode:
            raise RuntimeError("a deploy-mode MicroNet is inference-only; train the eager model instead")
        return super().train(False)


def lower(model: nn.Module) -> list[Op]:
    """The flat operation list of ``model.features`` (before any permutation is moved)."""
    ops: list[Op] = []
    _lower(model.features, model.in_chans, ops)
    return ops


BACKENDS = ("eager", "onnx")


def convert_to_deploy(
    model: nn.Module,
    backend: str = "eager",
    dtype: torch.dtype = torch.float32,
    merge_pairs: bool = True,
    fused_ops: bool = False,
) -> DeployMicroNet:
    """An inference-only copy of an eval-mode MicroNet with the same outputs (``docs/deploy.md``).

    ``backend`` picks between layouts that are equally exact but fast on different runtimes: ``onnx``
    also turns channel-multiplying depthwise convs into plain ones by repeating channels (ONNX Runtime
    runs those in its blocked layout; PyTorch's oneDNN is slower with the repeated channels).
    ``merge_pairs`` merges factorized k x 1 / 1 x k pairs into one k x k conv with an exact border
    correction (``merge_separable``): every pair for ``eager``; for ``onnx`` only the stem's pair (and, for
    M0's stem on phases, the depthwise pair after it): a merged k x k depthwise conv does k*k instead of
    2k multiply-adds and needs its border map added, which made it slower than the two convs in ORT.
    ``fused_ops`` (``onnx`` only) computes every Dynamic Shift-Max's fusion and max with one
    ``micronet.ShiftMax`` operator, which ONNX Runtime runs from the library in ``fused_ops.py``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if fused_ops and backend != "onnx":
        raise ValueError("fused_ops=True makes an ONNX Runtime graph; use it with backend='onnx'")
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise TypeError(f"convert_to_deploy expects a MicroNet; got {type(model).__name__}")
    ops = optimize(lower(model))
    if backend == "onnx":
        # repeating channels turns multiplier convs into depthwise ones, through which a permutation that was
        # stuck before (M0: the one after the stem) now moves into conv weights: optimize once more
        ops = optimize(expand_multipliers(ops))
    if merge_pairs:
        # ONNX Runtime: a merged conv with a channel multiplier falls back to its slow per-group path, and a
        # merged depthwise one costs k*k taps plus a border-map pass: only the stem's pairs are merged there
        ops = merge_separable(ops, plain_only=backend == "onnx", stem_only=backend == "onnx")
        if backend == "onnx":
            ops = phase_stem(ops)
    ops = fold_shift_max_scale(ops)
    features = _build(ops, dtype, use_matmul=backend == "onnx", fused_ops=fused_ops)
    pool = list(model.avgpool)
    if not (
        len(pool) == 3
        and isinstance(pool[0], nn.ReLU6)
        and isinstance(pool[1], nn.AdaptiveAvgPool2d)
        and isinstance(pool[2], nn.Hardswish)
    ):
        raise NotImplementedError(f"unexpected head pooling {model.avgpool}")
    head = nn.Sequential(
        nn.Hardswish(), *(_fold_linear(m, dtype) for m in model.classifier if not isinstance(m, nn.Dropout))
    )
    deployed = DeployMicroNet(features, head, getattr(model, "num_classes", 0))
    return deployed.eval().requires_grad_(False)


def deploy_summary(ops: list[Op]) -> dict[str, int]:
    """Counts of each operation kind in a flat list (explicit gathers left, convs, shift-max)."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    return counts


def register_cli(sub) -> None:
    """``micronet export`` lives in ``export.py``; registered from here so the CLI finds it by this module."""
    from .export import register_cli as register_export

    register_export(sub)
