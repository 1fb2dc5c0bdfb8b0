"""The microcontroller model's input side: camera pixels in, the normalization inside the graph.

A board feeds its camera's pixels (NHWC, 0..255, as int8 ``pixel - 128``) and does no float arithmetic, so the
normalization ``(p / 255 - mean) / std`` is the graph's first op (``PixelInput``), before any padding: the image
borders see the same zeros as the float model. For MicroNet it is folded into the stem conv (``PixelStem``),
which removes the two largest tensors at the stem from the TFLM arena; a stem kept as its factorized pair (the
``mcu`` form's ``stem="separable"``) takes it in its first conv (``PixelSeparableStem``). ``mcu_graph`` is the
float graph the int8 file quantizes (``runtime/mcu.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import MicroNet
from .convert import convert_to_deploy
from .modules import DeployMicroNet


class PixelInput(nn.Module):
    """``graph`` taking NHWC camera pixels (0..255) instead of normalized NCHW floats.

    ``(p / 255 - mean) / std`` is a 1 x 1 depthwise conv (weight ``1 / (255 std)``, bias ``-mean / std``): one
    int8 op, before any padding, so the borders see the same zeros as in the float model. With ``fold_stem``
    and a network whose first op is a dense 3 x 3, stride-2 conv (MicroNet's merged stem), the two are one conv on
    the pixels instead (``PixelStem``); with a network that starts with the stem's factorized pair, a dense 3 x 1
    conv of stride (2, 1) and a 1 x 3 depthwise one of stride (1, 2), the normalization goes into the first
    (``PixelSeparableStem``). ``trainable_stem``: folded from the stem's weights at every call, for
    quantization-aware training.
    """

    def __init__(
        self,
        graph: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        fold_stem: bool = False,
        trainable_stem: bool = False,
    ) -> None:
        super().__init__()
        c = len(mean)
        self.body = graph
        self.norm = nn.Conv2d(c, c, 1, groups=c)
        m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        with torch.no_grad():
            self.norm.weight.copy_((1.0 / (255.0 * s)).view(c, 1, 1, 1))
            self.norm.bias.copy_(-m / s)
        features = getattr(graph, "features", None)
        stem: nn.Module | None = None
        if fold_stem and isinstance(features, nn.Sequential):
            if PixelStem.folds(features[0], c):
                stem, rest = PixelStem(self.norm, features[0], trainable=trainable_stem), list(features)[1:]
            elif len(features) > 1 and PixelSeparableStem.folds(features[0], features[1], c):
                stem = PixelSeparableStem(self.norm, features[0], features[1], trainable=trainable_stem)
                rest = list(features)[2:]
        self.folded = stem is not None
        if stem is not None:  # a shallow copy with its own features: the caller's graph keeps taking normalized input
            self.body = copy.copy(graph)
            self.body._modules = dict(graph._modules)
            self.body._modules["features"] = nn.Sequential(stem, *rest)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)
        return self.body(x if self.folded else self.norm(x))


def fold_normalization(norm: nn.Conv2d, conv: nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv`` after the normalization ``norm`` (a 1 x 1 depthwise conv) as one conv on the pixels, away from the
    borders: ``conv``'s weights times ``norm``'s (``1 / (255 std)``) and the bias ``conv(norm(0))``, in ``dtype``
    (differentiable in ``conv``'s weights; ``norm`` holds constants)."""
    w = conv.weight.to(dtype)
    weight = w * norm.weight.detach().to(dtype).view(1, -1, 1, 1)
    bias = conv.bias.to(dtype) + (w * norm.bias.detach().to(dtype).view(1, -1, 1, 1)).sum((1, 2, 3))
    return weight, bias


class PixelStem(nn.Module):
    """The pixel normalization and a 3 x 3, stride-2, padding-1 conv after it, as one conv on the pixels.

    The normalization is a per-channel affine map and the conv is linear, so ``conv(norm(p)) = conv'(p) +
    conv(norm(0))``: ``conv'`` has the weights times ``1 / (255 std)``, and ``conv(norm(0))`` is a constant map.
    Its value away from the borders is ``conv'``'s bias, so ``conv'``'s output has the stem's own range (the
    int8 step the unfolded stem had); the rest, zero but at the borders (the merged pair's border correction,
    and the padding, ``-mean / std`` in pixels), is computed in float64 per input size, one ADD in the file.
    ``conv'`` is written 4 x 4 with a zero last row and column (on an even size the same outputs): TFLite's SAME
    padding of a 3 x 3 stride-2 conv pads after the image, PyTorch's before, so the 3 x 3 form needs a PAD op and
    its full-size output, while the 4 x 4 one is padded one pixel on each side, TFLite's SAME. The input, the
    normalized map and the padded map were the three largest tensors of the whole graph at the stem. Odd sizes
    take the unfolded path.
    """

    def __init__(self, norm: nn.Conv2d, conv: nn.Conv2d, trainable: bool = False) -> None:
        super().__init__()
        self.norm, self.conv, self.trainable = norm, conv, trainable
        self._maps: dict[tuple, torch.Tensor] = {}
        if not trainable:
            w4, bias = self.folded(torch.float64)
            self.register_buffer("weight", w4.detach().to(conv.weight.dtype))
            self.register_buffer("bias", bias.detach().to(conv.weight.dtype))

    def folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv'``'s 4 x 4 weights and its bias (``conv(norm(0))`` away from the borders), computed in ``dtype``
        from the stem conv's weights (differentiable: a trainable stem calls this at every step)."""
        w, bias = fold_normalization(self.norm, self.conv, dtype)
        return F.pad(w, (0, 1, 0, 1)), bias

    def frozen(self, round_weight: Callable[[torch.Tensor], torch.Tensor]) -> PixelStem:
        """A fixed copy of a trainable stem whose 4 x 4 weights are ``round_weight`` of the folded ones (what the
        int8 file stores: a quantization-aware run rounds the folded weights, not the stem conv's); its border map
        comes from the stem conv's own weights, as in training."""
        stem = PixelStem(copy.deepcopy(self.norm), copy.deepcopy(self.conv))
        with torch.no_grad():
            stem.weight.copy_(round_weight(self.folded(self.conv.weight.dtype)[0]))
        return stem

    @staticmethod
    def folds(conv: nn.Module, in_chans: int) -> bool:
        """Whether ``conv`` is a dense 3 x 3, stride-2, padding-1 conv on ``in_chans`` channels."""
        return (
            isinstance(conv, nn.Conv2d)
            and conv.in_channels == in_chans
            and conv.groups == 1
            and conv.kernel_size == (3, 3)
            and conv.stride == (2, 2)
            and conv.padding == (1, 1)
            and conv.dilation == (1, 1)
        )

    def offset_map(self, height: int, width: int) -> torch.Tensor:
        """``conv(norm(0))`` less the conv's bias at this input size, (1, C_out, H / 2, W / 2): zero but on the
        borders (computed at every call, with gradients, in a trainable stem; else once per size, in float64)."""
        if self.trainable:
            zero = torch.zeros(1, self.conv.in_channels, height, width, dtype=self.conv.weight.dtype)
            bias = self.folded(self.conv.weight.dtype)[1]
            return self.conv(self.norm(zero.to(self.conv.weight.device))) - bias.view(1, -1, 1, 1)
        key = (height, width, self.weight.device, self.weight.dtype)
        if key not in self._maps:
            with torch.no_grad():
                norm, conv = copy.deepcopy(self.norm).double(), copy.deepcopy(self.conv).double()
                zero = torch.zeros(1, self.conv.in_channels, height, width, dtype=torch.float64, device=key[2])
                emap = conv(norm(zero)) - self.bias.double().view(1, -1, 1, 1)
                self._maps[key] = emap.to(self.weight.dtype)
        return self._maps[key]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[2], pixels.shape[3]
        if h % 2 or w % 2:
            return self.conv(self.norm(pixels))
        weight, bias = self.folded(pixels.dtype) if self.trainable else (self.weight, self.bias)
        return F.conv2d(pixels, weight, bias, 2, 1) + self.offset_map(h, w)


class PixelSeparableStem(nn.Module):
    """The pixel normalization and the stem's factorized pair after it: a dense 3 x 1 conv of stride (2, 1) and
    padding (1, 0) (``conv1``), the normalization folded into it, then a 1 x 3 depthwise conv with a channel
    multiplier, stride (1, 2), padding (0, 1) (``conv2``).

    As in ``PixelStem``, ``conv1(norm(p)) = conv1'(p) + conv1(norm(0))``: ``conv1'`` has the weights times
    ``1 / (255 std)`` and ``conv1(norm(0))``'s value away from the borders as its bias; the rest is zero but on the
    top row (the only padding a 3 x 1 stride-2 conv reads on an even height) and the same in every column, a
    (1, C, H / 2, 1) map added with broadcasting, computed in float64 per input size. ``conv1'`` is written 4 x 1
    with a zero last row and ``conv2`` 1 x 4 with a zero last column (on an even size the same outputs), so TFLite's
    SAME padding is PyTorch's, with no PAD op. The pair costs TFLM's reference kernels fewer output elements times
    filter taps than the merged 3 x 3 conv (3 taps on a map half as large, then 3 on one channel), and the border
    map is a vector, not a full map. Odd sizes take the unfolded path.

    The pair's intermediate map is one more int8 tensor, quantized per tensor, whose channels can span very different
    ranges; each channel ``a`` of ``conv1'`` is scaled by ``s_a`` and the ``conv2`` weights that read it by
    ``1 / s_a`` (exact; ``conv2``'s weights are rounded per output channel, each of which reads one channel), so that
    every channel's bound over pixels 0..255 is the widest one's (``channel_scales``): each uses the whole int8 range.
    """

    def __init__(self, norm: nn.Conv2d, conv1: nn.Conv2d, conv2: nn.Conv2d, trainable: bool = False) -> None:
        super().__init__()
        self.norm, self.conv1, self.conv2, self.trainable = norm, conv1, conv2, trainable
        self._maps: dict[tuple, torch.Tensor] = {}
        if not trainable:
            w1, bias, w2 = self.folded(torch.float64)
            self.register_buffer("weight", w1.detach().to(conv1.weight.dtype))
            self.register_buffer("bias", bias.detach().to(conv1.weight.dtype))
            self.register_buffer("weight2", w2.detach().to(conv2.weight.dtype))

    def channel_scales(self, dtype: torch.dtype) -> torch.Tensor:
        """``s``: the widest channel's bound over the pixels 0..255 over each channel's (the bound of ``conv1'``'s
        output channel ``a``: its bias plus its positive, or negative, weights times 255), computed in ``dtype`` (no
        gradient: a scale of the form, not a weight)."""
        with torch.no_grad():
            w, bias = fold_normalization(self.norm, self.conv1, dtype)
            hi = bias + 255.0 * w.clamp_min(0).sum((1, 2, 3))
            lo = bias + 255.0 * w.clamp_max(0).sum((1, 2, 3))
            bound = torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)
            return bound.amax() / bound

    def folded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``conv1'``'s 4 x 1 weights and its bias (``conv1(norm(0))`` away from the borders), each channel times
        ``s``, and ``conv2``'s 1 x 4 weights over the ``s`` of the channel each reads, computed in ``dtype`` from the
        pair's weights (differentiable: a trainable stem calls this at every step)."""
        scale = self.channel_scales(dtype)
        w, bias = fold_normalization(self.norm, self.conv1, dtype)
        w1 = F.pad(w * scale.view(-1, 1, 1, 1), (0, 0, 0, 1))
        m = self.conv2.out_channels // self.conv2.in_channels
        w2 = self.conv2.weight.to(dtype) / scale.repeat_interleave(m).view(-1, 1, 1, 1)
        return w1, bias * scale, F.pad(w2, (0, 1))

    def frozen(self, round_weight: Callable[[torch.Tensor], torch.Tensor]) -> PixelSeparableStem:
        """A fixed copy of a trainable stem whose 4 x 1 and 1 x 4 weights are ``round_weight`` of the folded ones
        (what the int8 file stores); its border map comes from ``conv1``'s own weights, as in training."""
        stem = PixelSeparableStem(copy.deepcopy(self.norm), copy.deepcopy(self.conv1), copy.deepcopy(self.conv2))
        w1, _, w2 = self.folded(self.conv1.weight.dtype)
        with torch.no_grad():
            stem.weight.copy_(round_weight(w1))
            stem.weight2.copy_(round_weight(w2))
        return stem

    @staticmethod
    def folds(conv1: nn.Module, conv2: nn.Module, in_chans: int) -> bool:
        """Whether ``conv1`` is a dense 3 x 1 conv on ``in_chans`` channels, stride (2, 1), padding (1, 0), and
        ``conv2`` a 1 x 3 depthwise conv (any channel multiplier) on its output, stride (1, 2), padding (0, 1)."""
        return (
            isinstance(conv1, nn.Conv2d)
            and isinstance(conv2, nn.Conv2d)
            and type(conv2) is nn.Conv2d  # not an EdgeCorrectedConv or other subclass with its own forward
            and conv1.in_channels == in_chans
            and conv1.groups == 1
            and (conv1.kernel_size, conv1.stride, conv1.padding, conv1.dilation) == ((3, 1), (2, 1), (1, 0), (1, 1))
            and conv2.in_channels == conv1.out_channels
            and conv2.groups == conv2.in_channels
            and (conv2.kernel_size, conv2.stride, conv2.padding, conv2.dilation) == ((1, 3), (1, 2), (0, 1), (1, 1))
        )

    def offset_map(self, height: int) -> torch.Tensor:
        """``conv1(norm(0))`` times ``s`` less ``conv1'``'s bias at this input height, (1, C, H / 2, 1): zero but on
        the top row (computed at every call, with gradients, in a trainable stem; else once per height, in
        float64)."""
        if self.trainable:
            dtype = self.conv1.weight.dtype
            zero = torch.zeros(1, self.conv1.in_channels, height, 1, dtype=dtype, device=self.conv1.weight.device)
            scale = self.channel_scales(dtype).view(1, -1, 1, 1)
            return self.conv1(self.norm(zero)) * scale - self.folded(dtype)[1].view(1, -1, 1, 1)
        key = (height, self.weight.device, self.weight.dtype)
        if key not in self._maps:
            with torch.no_grad():
                norm, conv = copy.deepcopy(self.norm).double(), copy.deepcopy(self.conv1).double()
                zero = torch.zeros(1, self.conv1.in_channels, height, 1, dtype=torch.float64, device=key[1])
                scale = self.channel_scales(torch.float64).view(1, -1, 1, 1)
                emap = conv(norm(zero)) * scale - self.bias.double().view(1, -1, 1, 1)
                self._maps[key] = emap.to(self.weight.dtype)
        return self._maps[key]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[2], pixels.shape[3]
        if h % 2 or w % 2:
            return self.conv2(self.conv1(self.norm(pixels)))
        if self.trainable:
            weight, bias, weight2 = self.folded(pixels.dtype)
        else:
            weight, bias, weight2 = self.weight, self.bias, self.weight2
        x = F.conv2d(pixels, weight, bias, (2, 1), (1, 0)) + self.offset_map(h)
        return F.conv2d(x, weight2, self.conv2.bias, (1, 2), (0, 1), groups=self.conv2.groups)


def mcu_graph(model: nn.Module, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], **options: Any):
    """The float graph the int8 file quantizes: the ``mcu`` deploy form of a MicroNet (other models as they
    are), taking NHWC pixels."""
    pixel_graph = getattr(model, "pixel_graph", None)
    if isinstance(pixel_graph, PixelInput):  # a --qat graph trained on pixels (deploy.qat.Int8Graph), stem folded
        return pixel_graph.eval()
    graph = convert_to_deploy(model, backend="mcu", **options) if isinstance(model, MicroNet) else model.eval()
    # a deploy form (built here, or by the export's common path) has its stem first; a --qat graph of the earlier
    # form (trained on normalized images) keeps its trained stem weights as they are
    return PixelInput(graph, pixel_mean, pixel_std, fold_stem=isinstance(graph, DeployMicroNet)).eval()
