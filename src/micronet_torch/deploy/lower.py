"""Lowering an eager MicroNet to the flat operation list: BatchNorm folded, the hyper-function's affine folded."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.blocks import MicroBlock
from ..ops import ChannelShuffle, DynamicShiftMax
from .ir import Add, Conv, Op, Opaque, Perm, Pointwise, Save, ShiftMax


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
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
        w, b = fold_bn(conv.weight, conv.bias, bn)
    return Conv(w, b, tuple(conv.stride), tuple(conv.padding), conv.groups)


def shift_max_op(m: DynamicShiftMax) -> ShiftMax:
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
        ops.append(shift_max_op(module))
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


def lower(model: nn.Module) -> list[Op]:
    """The flat operation list of ``model.features`` (before any permutation is moved)."""
    ops: list[Op] = []
    _lower(model.features, model.in_chans, ops)
    return ops
