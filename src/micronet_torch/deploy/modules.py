"""The deploy-mode modules the converted operations become (all inference-only, all exact)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.op import shift_max
from ..ops import invert_permutation
from .fusions import is_row_conv
from .ir import NCHWC_BLOCK, Add, Conv, PhaseStem, Save, ShiftMax
from .permutations import is_identity


class ChannelGather(nn.Module):
    """A fixed channel permutation as one ``index_select`` (an ONNX Gather; a TFLite GATHER in the ``mcu`` form,
    whose index is int32 and, following from the network's structure, left out of the state dict)."""

    def __init__(self, index: torch.Tensor, dtype: torch.dtype = torch.long, persistent: bool = True) -> None:
        super().__init__()
        self.register_buffer("index", index.clone().to(dtype), persistent=persistent)

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
        self.fused_op = fused_op  # one micronet.ShiftMax operator (kernels.op) for the gather, products and max
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
        self.needs_gather = not is_identity(x_src)
        self.register_buffer("x_index", x_src.long())  # the (permuted) input itself
        if j == 2:
            shift_src = op.in_perm[op.shift[logical]]
            self.register_buffer("shift_index", shift_src.long())  # its shift
            self.register_buffer("pair_index", torch.stack([x_src, shift_src], dim=1).reshape(-1).long())
        # the fused operator's attribute: the input channels each output channel reads, (x, shift) per channel
        self.fused_index = (self.pair_index if j == 2 else self.x_index).tolist()

    def coefficients(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The fused coefficients, (N, C_out * K * J) in (c, k, j) order (divided by the scale if ``scaled``),
        from x's spatial mean (or ``pooled``, that mean computed another way: (N, C))."""
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3)) if pooled is None else pooled)))
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
    slower, enough to show in a whole network's time; PyTorch broadcasts it cheaply, so eager keeps the small
    map.
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
        self.plain = nn.Sequential(conv_module(a, dtype, full_maps), op.act, conv_module(b, dtype, full_maps))
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


class RowFoldedConv(nn.Conv2d):
    """A 1 x k conv with one input per group and m outputs per group, run with the rows folded into channels.

    A horizontal conv never mixes rows, so (N, C, H, W) viewed as (N, C * H, 1, W) is the same conv with
    each channel's weights repeated for its H rows. Output r of each group is then one depthwise conv over
    C * H channels, which ONNX Runtime runs in its blocked layout when C * H is a multiple of 16; its
    per-group path for a channel multiplier is slower (measured on M3's first block, 24 -> 48 channels at
    56 x 112). The m results are interleaved back to the original channel order. Other
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


def _rows_foldable(op: Conv) -> bool:
    """A row conv (any multiplier) that ONNX Runtime would not already run in its blocked layout."""
    return is_row_conv(op) and not (op.out_channels == op.in_channels and op.in_channels % NCHWC_BLOCK == 0)


def conv_module(op: Conv, dtype: torch.dtype, full_map: bool = False, fold_rows: bool = False) -> nn.Conv2d:
    """The module for one ``Conv``: a plain ``nn.Conv2d``, an ``EdgeCorrectedConv`` for a merged pair (its border
    map at full size if ``full_map``), or, with ``fold_rows``, a ``RowFoldedConv`` where that form applies."""
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


def nest_residuals(ops: list, make: Callable[[Any], nn.Module]) -> nn.Sequential:
    """Modules for a flat op list: ``make(op)`` per op, each ``Save`` ... ``Add`` run in a ``ResidualSequence``."""
    stack: list[list[nn.Module]] = [[]]
    for op in ops:
        if isinstance(op, Save):
            stack.append([])
        elif isinstance(op, Add):
            layers = stack.pop()
            stack[-1].append(ResidualSequence(*layers))
        else:
            stack[-1].append(make(op))
    if len(stack) != 1:
        raise RuntimeError("unbalanced residual markers")
    return nn.Sequential(*stack[0])
