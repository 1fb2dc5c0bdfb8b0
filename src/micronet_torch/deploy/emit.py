"""Emitters: the last step of the deploy compiler, turning a finished operation list into an inference-only network.

An emitter makes one module per operation (``Save`` ... ``Add`` nested as residual blocks) and folds the
classifier head. ``DeployEmitter`` makes the gather-based modules of PyTorch eager and ONNX Runtime
(``modules``), ``PortableEmitter`` the gather-free ones of the deployment runtimes (``portable``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..models.blocks import SwishLinear
from .ir import Conv, ConvShiftMax, Op, Perm, PhaseStem, ShiftMax
from .lower import fold_bn
from .modules import ChannelGather, DeployMicroNet, FusedShiftMax, PhaseStemConv, conv_module, nest_residuals
from .portable import PortableMicroNet, PortableShiftMax, TwinConvShiftMax, perm_module
from .portable_fused import PortableFusedShiftMax


def _fold_linear(unit: nn.Module, dtype: torch.dtype) -> nn.Module:
    """SwishLinear (Linear -> BN1d -> h-swish) as Linear -> h-swish with the BN folded in."""
    if not isinstance(unit, SwishLinear):
        return copy.deepcopy(unit)
    linear, bn, act = unit.linear
    w, b = fold_bn(linear.weight, linear.bias, bn)
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        out.bias.copy_(b.to(dtype))
    return nn.Sequential(out, copy.deepcopy(act))


def fold_head(model: nn.Module, dtype: torch.dtype) -> nn.Sequential:
    """The classifier after the pooled features: h-swish, then each linear with its BatchNorm folded in."""
    pool = list(model.avgpool)
    if not (
        len(pool) == 3
        and isinstance(pool[0], nn.ReLU6)
        and isinstance(pool[1], nn.AdaptiveAvgPool2d)
        and isinstance(pool[2], nn.Hardswish)
    ):
        raise NotImplementedError(f"unexpected head pooling {model.avgpool}")
    return nn.Sequential(
        nn.Hardswish(), *(_fold_linear(m, dtype) for m in model.classifier if not isinstance(m, nn.Dropout))
    )


@dataclass(frozen=True)
class Emitter:
    """Builds ``network(features, head, num_classes)``: ``module(op, dtype)`` for each operation of the features,
    the head folded from the eager model. Subclasses say which module each operation becomes."""

    network: ClassVar[type[DeployMicroNet]] = DeployMicroNet

    def module(self, op: Op, dtype: torch.dtype) -> nn.Module:
        """The module computing ``op``; an operation kept as it is (``Pointwise``, ``Opaque``) is its module."""
        return op.module  # type: ignore[union-attr]

    def features(self, ops: list[Op], dtype: torch.dtype = torch.float32) -> nn.Sequential:
        """The feature extractor: one module per operation, each residual block in a ``ResidualSequence``."""
        return nest_residuals(ops, lambda op: self.module(op, dtype))

    def __call__(self, model: nn.Module, ops: list[Op], dtype: torch.dtype = torch.float32) -> DeployMicroNet:
        """The inference-only network for ``ops`` (the features of ``model``) and ``model``'s head."""
        net = self.network(self.features(ops, dtype), fold_head(model, dtype), getattr(model, "num_classes", 0))
        return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class DeployEmitter(Emitter):
    """Gathers and ``FusedShiftMax`` for PyTorch eager and ONNX Runtime.

    ``use_matmul`` computes a Dynamic Shift-Max on a large map as one batched product and runs 1 x k convs with
    their rows folded into channels (ONNX Runtime's fast forms); ``full_maps`` stores border maps at full size;
    ``fused_ops`` computes every Dynamic Shift-Max's fusion and max with one ``micronet.ShiftMax`` operator.
    """

    use_matmul: bool = False
    full_maps: bool = False
    fused_ops: bool = False

    def module(self, op: Op, dtype: torch.dtype) -> nn.Module:
        if isinstance(op, Conv):
            return conv_module(op, dtype, self.full_maps, fold_rows=self.use_matmul)
        if isinstance(op, Perm):
            return ChannelGather(op.index)
        if isinstance(op, ShiftMax):
            return FusedShiftMax(op, dtype, self.use_matmul, self.fused_ops)
        if isinstance(op, PhaseStem):
            return PhaseStemConv(op, dtype, self.full_maps)
        return super().module(op, dtype)


@dataclass(frozen=True)
class PortableEmitter(Emitter):
    """Gather-free modules of at most 4-D tensors for OpenVINO, ExecuTorch/XNNPACK, LiteRT and ncnn.

    ``block_shuffles`` writes a shuffle of channel blocks as one 4-D transpose (else channel slices);
    ``fused_ops`` computes each Dynamic Shift-Max's fusion and max with one ``micronet::shift_max`` call
    (ExecuTorch's kernel) instead of standard operators.
    """

    network: ClassVar[type[DeployMicroNet]] = PortableMicroNet
    block_shuffles: bool = True
    fused_ops: bool = False

    def module(self, op: Op, dtype: torch.dtype) -> nn.Module:
        if isinstance(op, Conv):
            return conv_module(op, dtype)
        if isinstance(op, Perm):
            return perm_module(op.index, self.block_shuffles)
        if isinstance(op, ShiftMax):
            return PortableFusedShiftMax(op, dtype) if self.fused_ops else PortableShiftMax(op, dtype)
        if isinstance(op, ConvShiftMax):
            return TwinConvShiftMax(op, dtype)
        return super().module(op, dtype)


def build_modules(
    ops: list[Op], dtype: torch.dtype, use_matmul: bool, full_maps: bool | None = None, fused_ops: bool = False
) -> nn.Sequential:
    """``DeployEmitter``'s features for ``ops``; ``full_maps`` defaults to ``use_matmul`` (ONNX Runtime's forms)."""
    full_maps = use_matmul if full_maps is None else full_maps
    return DeployEmitter(use_matmul, full_maps, fused_ops).features(ops, dtype)
