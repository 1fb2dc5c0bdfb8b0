"""The portable deploy form's modules: a MicroNet graph built only from operators every deployment runtime runs fast.

The ``portable`` backends (``backends``) build them (``emit.PortableEmitter``). Each Dynamic Shift-Max stays in its
logical channel order, so its group-circular shift is a few channel rolls (two slices and a concatenation
each) whose 0/1 masks are folded into the coefficients, or the output of a twin convolution, instead of a
gather (``index_select`` / ONNX ``Gather``, which XNNPACK, LiteRT and ncnn cannot run in-graph). A channel
shuffle left after the passes is the 4-D reshape -> transpose -> reshape every runtime knows, or channel
slices. Means keep their dimensions, the max over the K fusions is an elementwise maximum, and no tensor has
more than 4 dimensions. Exact up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.shuffle import shuffle_permutation
from .fusions import pair_shift_convs
from .ir import Conv, ConvShiftMax, ShiftMax
from .modules import DeployMicroNet, conv_module
from .permutations import densify_shuffles, is_identity, move_perms_past_shift_max

__all__ = [
    "ChannelShuffle4d",
    "ChannelSlices",
    "ConvShiftMax",
    "PortableMicroNet",
    "PortableShiftMax",
    "TwinConvShiftMax",
    "block_shuffle",
    "channel_runs",
    "densify_shuffles",
    "move_perms_past_shift_max",
    "pair_shift_convs",
    "perm_module",
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


def perm_module(index: torch.Tensor, block_shuffles: bool = True) -> nn.Module:
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
        if not (is_identity(op.in_perm) and is_identity(op.out_perm)):
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

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The fusion coefficients of every term, (N, terms * C, 1, 1)."""
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        coef = (F.hardsigmoid(z) if self.scaled else torch.clamp(z, self.lo, self.hi)) + self.offset
        return coef if self.mask is None else coef * self.mask

    def shifted_maps(self, x: torch.Tensor, x_shifted: torch.Tensor | None) -> list[torch.Tensor]:
        """The group-circular shifts of ``x`` the fusion adds: the twin conv's output, or channel rolls."""
        if self.shifted_input:
            if x_shifted is None:
                raise ValueError("this Dynamic Shift-Max takes its shifted input from its TwinConvShiftMax")
            return [x_shifted]
        return [x if d == 0 else torch.cat([x[:, d:], x[:, :d]], dim=1) for d in self.rolls]

    def forward(self, x: torch.Tensor, x_shifted: torch.Tensor | None = None) -> torch.Tensor:
        c, k = self.channels, self.k
        coef = self.coefficients(x)
        a = [coef[:, i * c : (i + 1) * c] for i in range(coef.shape[1] // c)]  # each (N, C, 1, 1)
        rolled = self.shifted_maps(x, x_shifted)
        out = None
        for kk in range(k):
            y = x * a[kk]
            for r, xr in enumerate(rolled):
                y = y + xr * a[k + kk * len(rolled) + r]
            out = y if out is None else torch.maximum(out, y)
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, K={self.k}, J={self.j}, scaled={self.scaled}"


def _shifted_rows(conv: Conv, index: torch.Tensor) -> Conv:
    """The conv whose output channel i is output channel ``index[i]`` of ``conv`` (its rows permuted: exact)."""
    edge = None if conv.edge is None else conv.edge[index]
    return Conv(conv.weight[index], conv.bias[index], conv.stride, conv.padding, conv.groups, edge)


class TwinConvShiftMax(nn.Module):
    """A dense conv and its Dynamic Shift-Max, with the group-circular shift folded into a second conv.

    The shifted map ``x[:, shift]`` is the same conv with its output rows in shift order, so a twin conv reads
    the same input and emits it directly: no channel roll, no mask, one product per fusion less. It costs one
    more small conv and was measured faster than the rolls in OpenVINO, LiteRT, ExecuTorch and ncnn.
    """

    def __init__(self, op: ConvShiftMax, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = conv_module(op.conv, dtype)
        self.conv_shifted = conv_module(_shifted_rows(op.conv, op.shift_max.shift), dtype)
        self.shift_max = PortableShiftMax(op.shift_max, dtype, shifted_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift_max(self.conv(x), self.conv_shifted(x))


class PortableMicroNet(DeployMicroNet):
    """Inference-only MicroNet in portable operators: ``features``, then a keepdim mean, flatten and the head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.features(x)).mean((2, 3), keepdim=True)
        return self.head(torch.flatten(x, 1))
