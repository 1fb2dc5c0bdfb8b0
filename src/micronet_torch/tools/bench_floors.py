"""Floors for ``micronet bench --runtimes --floors``: what MicroNet would cost in a runtime if its Dynamic Shift-Max
were cheaper, measured on the very graph the runtime runs.

``+relu`` replaces every Dynamic Shift-Max of the deploy graph by ReLU (the convolutions, pooling and head
unchanged, the way bench-train's ReLU floor does for training): no activation can cost less, so no Dynamic
Shift-Max implementation, standard operators or custom kernel, can take MicroNet below it. ``+noshift`` keeps
the hyper-function and the max over the K fusions but drops the shifted term (J = 1): it does a strict subset
of the operator's work with the same standard operators, so it bounds what any rewrite of the shift can gain.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.modules import ChannelGather, FusedShiftMax
from ..deploy.portable import PortableShiftMax, TwinConvShiftMax

FLOORS = ("relu", "noshift")


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


def floor_graph(graph: nn.Module, kind: str) -> nn.Module:
    """A copy of a deploy graph with every Dynamic Shift-Max replaced as ``kind`` ("relu" or "noshift") says."""
    if kind not in FLOORS:
        raise ValueError(f"unknown floor {kind!r}; choose one of {FLOORS}")
    out = copy.deepcopy(graph).eval()
    make = _relu if kind == "relu" else NoShiftMax
    replaced = _replace(out, make)
    if not replaced:
        raise ValueError("no Dynamic Shift-Max in this graph: floors are for MicroNet deploy graphs")
    return out


def _replace(module: nn.Module, make) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, TwinConvShiftMax):  # the twin conv is the shift: the floor keeps only the conv
            setattr(module, name, nn.Sequential(child.conv, make(child.shift_max)))
            count += 1
        elif isinstance(child, (PortableShiftMax, FusedShiftMax)):
            setattr(module, name, make(child))
            count += 1
        else:
            count += _replace(child, make)
    return count
