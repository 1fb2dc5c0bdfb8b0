"""MicroNet's building blocks: the stem, Micro-Block-A/B/C, the final pointwise block and the head.

Each block is built from one table row (``specs.BlockSpec``). Submodules sit at the same positions
as in the published code (``layers.<i>``; empty slots are ``nn.Identity``), so published and
PaddleClas checkpoints load by name with no renaming table to maintain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops import (
    ChannelShuffle,
    DepthwiseConvBN,
    DynamicShiftMax,
    GroupConvBN,
    MicroFactorizedDepthwise,
    SqueezeExcite,
)
from .specs import BlockSpec

ACTIVATIONS = ("dsm", "dsm_j1", "relu", "se")
DEPTHWISE = ("micro", "full")
POINTWISE = ("micro", "plain")
BASE_REDUCTION = 8  # the published activation config's REDUCTION; a row's reduction is 8 * r


@dataclass(frozen=True)
class Variant:
    """Options that swap an operator for its ablation baseline (the defaults build the published model).

    activation: ``dsm`` Dynamic Shift-Max; ``dsm_j1`` its J = 1 form (no shift, DY-ReLU-like);
        ``relu`` ReLU6 where DSM has K = 2 and nothing where K = 1 (the published code's ablation);
        ``se`` squeeze-excitation followed by the same ReLU6 / nothing.
    shift: ``published`` (group and in-group rotation) or ``group`` (the paper's formula).
    depthwise: ``micro`` (k x 1 then 1 x k) or ``full`` (k x k).
    pointwise: ``micro`` (grouped 1 x 1 halves) or ``plain`` (ungrouped 1 x 1 convolutions).
    """

    activation: str = "dsm"
    shift: str = "published"
    depthwise: str = "micro"
    pointwise: str = "micro"

    def __post_init__(self) -> None:
        for name, allowed in (("activation", ACTIVATIONS), ("depthwise", DEPTHWISE), ("pointwise", POINTWISE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} variant {getattr(self, name)!r}; choose one of {allowed}")


def make_activation(
    kind: int,
    channels: int,
    groups: int,
    reduction: int,
    init_a: tuple[float, float],
    init_b: tuple[float, float],
    variant: Variant,
    fallback: nn.Module,
) -> nn.Module:
    """The activation of a row's ``y`` slot: ``fallback`` when 0, else Dynamic Shift-Max with K = kind."""
    if kind == 0:
        return fallback
    if variant.activation in ("dsm", "dsm_j1"):
        return DynamicShiftMax(
            channels,
            groups,
            k=kind,
            j=2 if variant.activation == "dsm" else 1,
            reduction=reduction,
            init_a=init_a,
            init_b=init_b,
            shift=variant.shift,
        )
    relu = nn.ReLU6(inplace=True) if kind == 2 else nn.Identity()
    if variant.activation == "se":
        return nn.Sequential(SqueezeExcite(channels, reduction), relu)
    return relu


class SpatialSeparableStem(nn.Module):
    """Conv (3x1, stride (2,1)) -> BN -> depthwise-grouped Conv (1x3, stride (1,2)) -> BN -> shuffle(s1)."""

    def __init__(self, in_chans: int, groups: tuple[int, int]) -> None:
        super().__init__()
        s1, s2 = groups
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, s1, (3, 1), (2, 1), (1, 0), bias=False),
            nn.BatchNorm2d(s1),
            nn.Conv2d(s1, s1 * s2, (1, 3), (1, 2), (0, 1), bias=False, groups=s1),
            nn.BatchNorm2d(s1 * s2),
            ChannelShuffle(s1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stem(nn.Module):
    """MicroNet's stem: spatial-separable convolution then ReLU6; stride 2, s1 * s2 output channels."""

    def __init__(self, in_chans: int, groups: tuple[int, int]) -> None:
        super().__init__()
        self.out_channels = groups[0] * groups[1]
        self.stem = nn.Sequential(SpatialSeparableStem(in_chans, groups), nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def _shuffle_if(condition: bool, groups: int) -> nn.Module:
    return ChannelShuffle(groups) if condition else nn.Identity()


class MicroBlock(nn.Module):
    """One table row: Micro-Block-A (g1 = 0), Micro-Block-B/C (g1, g3 > 0) or the final pointwise block.

    A:     depthwise (k x 1, 1 x k, widening e1 * e2) -> act -> shuffles -> pointwise squeeze -> act -> shuffles
    B/C:   pointwise expand -> act -> shuffle -> depthwise -> act -> shuffle -> pointwise squeeze -> act -> shuffles
    final: pointwise expand -> act
    A residual is added when the stride is 1 and the channel count is kept.
    """

    def __init__(
        self,
        in_channels: int,
        row: BlockSpec,
        init_a: tuple[float, float] = (1.0, 1.0),
        init_b: tuple[float, float] = (0.0, 0.0),
        variant: Variant | None = None,
    ) -> None:
        super().__init__()
        variant = variant or Variant()
        self.row = row
        self.kind = row.kind
        self.in_channels, self.out_channels = in_channels, row.c
        self.hidden_channels = in_channels * row.e1 * row.e2
        self.stride = row.s
        self.use_residual = row.s == 1 and in_channels == row.c
        builder = {"A": self._block_a, "BC": self._block_bc, "final": self._block_final}[self.kind]
        self.layers = nn.Sequential(*builder(in_channels, row, init_a, init_b, variant))

    @staticmethod
    def _pointwise(cin: int, cout: int, groups: int, variant: Variant) -> GroupConvBN:
        return GroupConvBN(cin, cout, groups if variant.pointwise == "micro" else 1)

    @staticmethod
    def _depthwise(channels: int, row: BlockSpec, multipliers: tuple[int, int], variant: Variant) -> nn.Module:
        cls = MicroFactorizedDepthwise if variant.depthwise == "micro" else DepthwiseConvBN
        return cls(channels, row.k, row.s, multipliers)

    def _block_a(self, inp, row, init_a, init_b, variant) -> list[nn.Module]:
        h, c, red = self.hidden_channels, row.c, BASE_REDUCTION * row.r
        return [
            self._depthwise(inp, row, (row.e1, row.e2), variant),
            make_activation(row.y2, h, row.g2, red, init_a, init_b, variant, nn.ReLU6(inplace=True)),
            ChannelShuffle(row.g2),
            _shuffle_if(row.y2 != 0, h // 2),
            self._pointwise(h, c, row.g3, variant),
            make_activation(row.y3, c, row.g4, red // 2, (1.0, 0.0), (0.0, 0.0), variant, nn.Identity()),
            ChannelShuffle(row.g4),
            _shuffle_if(row.y3 != 0 and c % 2 == 0, c // 2),
        ]

    def _block_bc(self, inp, row, init_a, init_b, variant) -> list[nn.Module]:
        h, c, red = self.hidden_channels, row.c, BASE_REDUCTION * row.r
        if row.y1 != 0 and row.y2 != 0:
            mid_shuffle = ChannelShuffle(h // 4)
        elif row.y1 == 0 and row.y2 == 0:
            mid_shuffle = nn.Identity()
        else:
            mid_shuffle = ChannelShuffle(h // 2)
        return [
            self._pointwise(inp, h, row.g1, variant),
            make_activation(row.y1, h, row.g2, red, init_a, init_b, variant, nn.ReLU6(inplace=True)),
            ChannelShuffle(row.g2),
            self._depthwise(h, row, (1, 1), variant),
            nn.Identity(),
            make_activation(row.y2, h, h // row.g2, red, init_a, init_b, variant, nn.ReLU6(inplace=True)),
            mid_shuffle,
            self._pointwise(h, c, row.g3, variant),
            make_activation(
                row.y3, c, row.g4, red // 2 if c < h else red, (1.0, 0.0), (0.0, 0.0), variant, nn.Identity()
            ),
            ChannelShuffle(row.g4),
            _shuffle_if(row.y3 != 0, c // 2),
        ]

    def _block_final(self, inp, row, init_a, init_b, variant) -> list[nn.Module]:
        h = self.hidden_channels
        return [
            self._pointwise(inp, h, row.g1, variant),
            make_activation(row.y3, h, row.g2, BASE_REDUCTION * row.r, (1.0, 0.0), (0.0, 0.0), variant, nn.Identity()),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        if self.use_residual:
            out = out + x
        return out


class SwishLinear(nn.Module):
    """Linear -> BatchNorm1d -> h-swish, the published head's unit (the logits pass through it too)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Sequential(nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.Hardswish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
