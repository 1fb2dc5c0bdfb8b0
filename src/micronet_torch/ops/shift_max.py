"""Dynamic Shift-Max: MicroNet's input-dependent activation, and the variants the paper ablates.

For C channels in G groups, y_i = max_{k<K} sum_{j<J} a^k_{i,j}(x) * x_{shift_j(i)}, where shift_0 is
the identity and shift_1 the group-circular channel shift. The coefficients a come from a small
squeeze-excitation hyper-function of x, so the activation adapts to each input (SPEC section 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import make_divisible
from torch import nn

SHIFT_MODES = ("published", "group")


def squeeze_channels(channels: int, reduction: int) -> int:
    """Hidden width S of the hyper-function: make_divisible(C // reduction, 4), at least 4."""
    return max(4, make_divisible(channels // reduction, 4))


def shift_index(channels: int, groups: int, mode: str = "published") -> torch.Tensor:
    """Index vector of the group-circular shift: ``x_shifted = x[:, index]``.

    Channels are viewed as (G, C/G). ``"published"`` (what the released weights need) takes channel
    (g, p) from ((g+1) mod G, (p+1) mod C/G); ``"group"`` (the paper's formula) from ((g+1) mod G, p).
    """
    if mode not in SHIFT_MODES:
        raise ValueError(f"unknown shift mode {mode!r}; choose one of {SHIFT_MODES}")
    if groups <= 0 or channels % groups:
        raise ValueError(f"Dynamic Shift-Max needs groups dividing channels; got {channels} channels, {groups} groups")
    grid = torch.arange(channels).view(groups, channels // groups).roll(-1, dims=0)
    if mode == "published":
        grid = grid.roll(-1, dims=1)
    return grid.reshape(-1)


class DynamicShiftMax(nn.Module):
    """Dynamic Shift-Max over ``channels`` channels in ``groups`` groups.

    Args:
        channels: C, the number of input (and output) channels.
        groups: G, the number of channel groups the circular shift moves between.
        k: K, the number of fusions the max runs over (1 means a plain dynamic fusion, no max).
        j: J, the number of shifted copies fused (2: x and its shift; 1: no shift, DY-ReLU-like).
        reduction: the hyper-function's squeeze ratio (S = make_divisible(C // reduction, 4)).
        init_a: the offsets added to a^1, a^2 (the coefficients of x itself).
        init_b: the offsets added to b^1, b^2 (the coefficients of the shifted x).
        shift: ``"published"`` (group and in-group rotation, needed by the released weights) or
            ``"group"`` (the paper's group-only shift).
        act_max: the hyper-function's output range: coefficients are (h_sigmoid - 0.5) * 2 * act_max.
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        k: int = 2,
        j: int = 2,
        reduction: int = 8,
        init_a: Sequence[float] = (1.0, 0.0),
        init_b: Sequence[float] = (0.0, 0.0),
        shift: str = "published",
        act_max: float = 2.0,
    ) -> None:
        super().__init__()
        if k not in (1, 2) or j not in (1, 2):
            raise ValueError(f"Dynamic Shift-Max supports K in (1, 2) and J in (1, 2); got K={k}, J={j}")
        self.channels, self.groups, self.k, self.j = channels, groups, k, j
        self.shift_mode = shift
        self.scale = 2.0 * act_max
        self.init_a = tuple(float(v) for v in init_a)
        self.init_b = tuple(float(v) for v in init_b)
        squeeze = squeeze_channels(channels, reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, channels * j * k),
            nn.Hardsigmoid(),
        )
        # The shift is a fixed function of the shape, not a weight: never saved in checkpoints.
        self.register_buffer("index", shift_index(channels, groups, shift), persistent=False)
        # Offsets in the published order a1, b1, a2, b2 (a1, a2 when J = 1), each C long.
        offsets = []
        for kk in range(k):
            offsets.append(self.init_a[kk])
            if j == 2:
                offsets.append(self.init_b[kk])
        self.register_buffer("offset", torch.tensor(offsets).repeat_interleave(channels), persistent=False)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic coefficients, shaped (N, K, J, C, 1, 1)."""
        n = x.shape[0]
        z = self.fc(x.mean((2, 3)))
        z = (z - 0.5) * self.scale + self.offset
        return z.view(n, self.k, self.j, self.channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coef = self.coefficients(x)
        if self.j == 2:
            shifted = torch.index_select(x, 1, self.index)
            out = x * coef[:, 0, 0] + shifted * coef[:, 0, 1]
            if self.k == 2:
                out = torch.maximum(out, x * coef[:, 1, 0] + shifted * coef[:, 1, 1])
        else:
            out = x * coef[:, 0, 0]
            if self.k == 2:
                out = torch.maximum(out, x * coef[:, 1, 0])
        return out

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, groups={self.groups}, K={self.k}, J={self.j}, "
            f"init_a={self.init_a}, init_b={self.init_b}, shift={self.shift_mode!r}"
        )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with an h-sigmoid gate, the published code's SE ablation (x * gate(x))."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        squeeze = make_divisible(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, channels),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]
