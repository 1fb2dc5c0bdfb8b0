"""Micro-factorized convolutions: the paper's way to cut MAdds while keeping every input connected.

Pointwise: a C_in x C_out 1x1 convolution W becomes P . Phi . Q^T (a grouped squeeze, a channel
shuffle, a grouped expand). Depthwise: a k x k depthwise convolution becomes k x 1 then 1 x k.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .shuffle import ChannelShuffle


def group_adaptive_groups(channels: int, reduction: int) -> int:
    """The paper's group-adaptive G = sqrt(C / R): the divisor of C/R closest to that square root.

    With this G every output of the factorized pointwise convolution is connected to every input
    (E = C^2 / (R G^2) = C) at the lowest cost.
    """
    if channels % reduction:
        raise ValueError(f"reduction R={reduction} must divide C={channels}")
    hidden = channels // reduction
    target = math.sqrt(hidden)
    divisors = [g for g in range(1, hidden + 1) if hidden % g == 0 and channels % g == 0]
    return min(divisors, key=lambda g: (abs(g - target), g))


class GroupConvBN(nn.Module):
    """Grouped 1x1 convolution + BatchNorm: one half (Q^T or P) of a micro-factorized pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide both {in_channels} input and {out_channels} output channels")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, 1, 0, bias=False, groups=groups),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MicroFactorizedPointwise(nn.Module):
    """W = P . Phi . Q^T: squeeze C_in -> C_in/R (G groups), shuffle, expand -> C_out (G groups).

    Costs (C_in + C_out) * C_in / (R * G) per pixel instead of C_in * C_out. ``groups=None`` picks the
    group-adaptive G = sqrt(C_in / R). MicroNet's blocks split the two halves across block parts;
    this module keeps them together for reuse in other networks.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, groups: int | None = None) -> None:
        super().__init__()
        if in_channels % reduction:
            raise ValueError(f"reduction R={reduction} must divide C_in={in_channels}")
        hidden = in_channels // reduction
        groups = groups or group_adaptive_groups(in_channels, reduction)
        self.squeeze = GroupConvBN(in_channels, hidden, groups)
        self.shuffle = ChannelShuffle(groups)
        self.expand = GroupConvBN(hidden, out_channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.shuffle(self.squeeze(x)))


class MicroFactorizedDepthwise(nn.Module):
    """k x 1 then 1 x k depthwise convolutions (each + BN), stride split as (s, 1) then (1, s).

    ``multipliers=(e1, e2)`` widen the channels C -> C*e1 -> C*e1*e2, Micro-Block-A's cheap expansion.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, stride: int = 1, multipliers: tuple[int, int] = (1, 1)
    ) -> None:
        super().__init__()
        e1, e2 = multipliers
        mid, out = channels * e1, channels * e1 * e2
        self.in_channels, self.out_channels = channels, out
        pad = kernel_size // 2
        self.conv = nn.Sequential(
            nn.Conv2d(channels, mid, (kernel_size, 1), (stride, 1), (pad, 0), bias=False, groups=channels),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, out, (1, kernel_size), (1, stride), (0, pad), bias=False, groups=mid),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DepthwiseConvBN(nn.Module):
    """A plain k x k depthwise convolution + BN (the ablation baseline for MicroFactorizedDepthwise)."""

    def __init__(
        self, channels: int, kernel_size: int = 3, stride: int = 1, multipliers: tuple[int, int] = (1, 1)
    ) -> None:
        super().__init__()
        out = channels * multipliers[0] * multipliers[1]
        self.in_channels, self.out_channels = channels, out
        self.conv = nn.Sequential(
            nn.Conv2d(channels, out, kernel_size, stride, kernel_size // 2, bias=False, groups=channels),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
