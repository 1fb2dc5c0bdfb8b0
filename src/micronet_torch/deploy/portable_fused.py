"""Dynamic Shift-Max for the portable graph with a runtime kernel: the hyper-function in standard operators the
delegate lowers (keepdim mean, Linear, ReLU, h-sigmoid), the fusion and max as one ``micronet::shift_max`` call
(ExecuTorch's kernel, ``runtime/executorch_ops.py``), which reads the map and its shift once."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.op import shift_max
from .ir import ShiftMax
from .modules import FusedShiftMax


class PortableFusedShiftMax(nn.Module):
    """``FusedShiftMax``'s coefficients and kernel call, with the pooling XNNPACK's partitioner accepts."""

    def __init__(self, op: ShiftMax, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fused = FusedShiftMax(op, dtype, use_matmul=False, fused_op=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fused
        coef = f.coefficients(x, torch.flatten(x.mean((2, 3), keepdim=True), 1))  # XNNPACK takes keepdim means
        return shift_max(x, coef, f.fused_index, f.k, f.j)

    def extra_repr(self) -> str:
        f = self.fused
        return f"channels={f.in_channels}, K={f.k}, J={f.j}, scaled={f.scaled}, op=micronet::shift_max"
