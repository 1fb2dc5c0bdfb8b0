"""Benchmark-only stand-ins for Dynamic Shift-Max: what MicroNet would cost if its activation were cheaper.

Neither is part of the model or its operators; the benchmarks put them in its place to measure floors:

- ``ReLUFloor`` / ``replace_shift_max`` (``micronet bench-train``'s ``relu`` variant): ReLU in the training
  network, the cost no activation can go below.
- ``deploy_relu`` and ``NoShiftMax`` (``micronet bench --runtimes --floors``): ReLU, or the operator without its
  shifted term (J = 1), in a deploy graph: the first bounds every Dynamic Shift-Max implementation, the second
  what any rewrite of the shift can gain.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.modules import ChannelGather, FusedShiftMax
from ..deploy.portable import PortableShiftMax
from ..ops import DynamicShiftMax


class ReLUFloor(nn.Module):
    """ReLU as ``clamp_min``: its backward keeps the input, so the network may modify its output in place
    (as it may a Dynamic Shift-Max's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)


def replace_shift_max(model: nn.Module) -> int:
    """Replace every DynamicShiftMax in ``model`` by ReLU, in place; returns how many were replaced."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, DynamicShiftMax):
            setattr(model, name, ReLUFloor())
            count += 1
        else:
            count += replace_shift_max(child)
    return count


class NoShiftMax(nn.Module):
    """max_k x * a_k with the coefficients a_k of a deploy Dynamic Shift-Max: its hyper-function, no shift."""

    def __init__(self, dsm: PortableShiftMax | FusedShiftMax) -> None:
        super().__init__()
        self.k, self.scaled, self.lo, self.hi = dsm.k, dsm.scaled, dsm.lo, dsm.hi
        if isinstance(dsm, PortableShiftMax):  # rows: a_k0 for each k first, in C blocks
            c = dsm.channels
            rows = torch.arange(self.k * c)
            self.gather: nn.Module = nn.Identity()
            self.fc1 = copy.deepcopy(dsm.fc1)
            self.fc2 = nn.Conv2d(dsm.fc2.in_channels, rows.numel(), 1)
        else:  # FusedShiftMax rows in (c, k, j) order: take j = 0, then regroup as K blocks of C
            c, j = dsm.out_channels, dsm.j
            rows = (torch.arange(self.k).view(-1, 1) * j + torch.arange(c).view(1, -1) * self.k * j).reshape(-1)
            self.gather = ChannelGather(dsm.x_index) if dsm.needs_gather else nn.Identity()
            self.fc1 = nn.Conv2d(dsm.fc1.in_features, dsm.fc1.out_features, 1)
            self.fc2 = nn.Conv2d(dsm.fc2.in_features, rows.numel(), 1)
            with torch.no_grad():
                self.fc1.weight.copy_(dsm.fc1.weight.view(*dsm.fc1.weight.shape, 1, 1))
                self.fc1.bias.copy_(dsm.fc1.bias)
        self.channels = c
        w2 = dsm.fc2.weight.reshape(dsm.fc2.weight.shape[0], -1)
        with torch.no_grad():
            self.fc2.weight.copy_(w2[rows].view(rows.numel(), -1, 1, 1))
            self.fc2.bias.copy_(dsm.fc2.bias[rows])
        self.register_buffer("offset", dsm.offset.reshape(-1)[rows].view(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        coef = (F.hardsigmoid(z) if self.scaled else torch.clamp(z, self.lo, self.hi)) + self.offset
        xs = self.gather(x)
        c = self.channels
        out = xs * coef[:, :c]
        for kk in range(1, self.k):
            out = torch.maximum(out, xs * coef[:, kk * c : (kk + 1) * c])
        return out


def _relu(dsm: PortableShiftMax | FusedShiftMax) -> nn.Module:
    """ReLU in the place of a Dynamic Shift-Max (after the channel selection its output needs, if any)."""
    if isinstance(dsm, FusedShiftMax) and dsm.needs_gather:
        return nn.Sequential(ChannelGather(dsm.x_index), nn.ReLU())
    return nn.ReLU()


def deploy_relu(dsm: PortableShiftMax | FusedShiftMax) -> nn.Module:
    """ReLU in the place of a Dynamic Shift-Max (after the channel selection its output needs, if any)."""
    if isinstance(dsm, FusedShiftMax) and dsm.needs_gather:
        return nn.Sequential(ChannelGather(dsm.x_index), nn.ReLU())
    return nn.ReLU()
