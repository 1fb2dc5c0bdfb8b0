"""Channel shuffle and channel permutations as index vectors.

MicroNet moves channels between groups with fixed permutations (the paper's Φ). Representing each
one as an index vector lets the deploy path compose consecutive shuffles into one gather and fold
them into neighbouring convolution weights.
"""

from __future__ import annotations

import torch
from torch import nn


def shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """Index vector ``idx`` with ``channel_shuffle(x, groups) == x[:, idx]``."""
    if groups <= 0 or channels % groups:
        raise ValueError(f"channel shuffle needs groups dividing channels; got {channels} channels, {groups} groups")
    return torch.arange(channels).view(groups, channels // groups).t().reshape(-1)


def compose_permutations(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The single gather equal to gathering with ``first`` and then with ``second``."""
    return first[second]


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Index vector ``inv`` with ``x[:, perm][:, inv] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view (N, g, C/g, ...), swap the two channel axes, flatten back."""
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class ChannelShuffle(nn.Module):
    """Channel shuffle with ``groups`` groups (the fixed permutation Φ of micro-factorized convolution)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = int(groups)

    def permutation(self, channels: int) -> torch.Tensor:
        return shuffle_permutation(channels, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return x
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
