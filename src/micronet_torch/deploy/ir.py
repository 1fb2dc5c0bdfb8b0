"""The deploy compiler's intermediate representation: a flat list of simple operations.

Weights are kept in float64 while they are folded and permuted, and cast once when modules are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# ONNX Runtime's blocked (NCHWc) layout: channels in blocks of this many (AVX-512); a depthwise conv runs there
# only with a multiple of it
NCHWC_BLOCK = 16


@dataclass
class Conv:
    """A convolution with its BatchNorm folded in (weight (C_out, C_in/groups, kh, kw), bias (C_out))."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    # set by ``merge_separable``: (C_out, kw) terms -b1 * w2[o, j] to add where tap j reads the zero padding
    # of the merged pair's intermediate (the left / right border columns); see ``EdgeCorrectedConv``
    edge: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]


@dataclass
class Perm:
    """A channel permutation: ``out = x[:, index]``."""

    index: torch.Tensor


@dataclass
class Pointwise:
    """A channel-independent activation (ReLU6, h-swish, ...): commutes with every permutation."""

    module: nn.Module


@dataclass
class Opaque:
    """Any other module, kept as it is; no permutation moves across it."""

    module: nn.Module


@dataclass
class Save:
    """Start of a residual block: remember the input."""


@dataclass
class Add:
    """End of a residual block: add the remembered input."""


@dataclass
class ShiftMax:
    """Dynamic Shift-Max in logical channel order, with an input and an output permutation around it.

    Computes ``y[:, out_perm]`` where ``y = DSM(x)`` and ``x = t[:, in_perm]`` for the actual input t.
    ``w2``/``b2`` already hold the hyper-function's scale, so the coefficients are
    ``clamp(w2 @ relu(w1 @ mean(x) + b1) + b2, lo, hi) + offset`` (rows in the published order k, j, c).
    ``out_perm`` may repeat channels (a selection): the activation then also feeds a channel multiplier.
    """

    channels: int
    k: int
    j: int
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    offset: torch.Tensor
    lo: float
    hi: float
    shift: torch.Tensor
    in_perm: torch.Tensor = field(default=None)  # type: ignore[assignment]
    out_perm: torch.Tensor = field(default=None)  # type: ignore[assignment]
    # set when the next convolution has absorbed the factor ``scale``: the module then outputs y / scale
    scaled: bool = False
    scale: float = 4.0

    def __post_init__(self) -> None:
        if self.in_perm is None:
            self.in_perm = torch.arange(self.channels)
        if self.out_perm is None:
            self.out_perm = torch.arange(self.channels)


@dataclass
class PhaseStem:
    """A dense 3 x 3 stride-2 conv, a pointwise activation and a depthwise 3 x 3 stride-2 conv, to be computed
    on the 2 x 2 phases of the first conv's output (``phase_stem``)."""

    a: Conv
    act: nn.Module
    b: Conv


@dataclass
class ConvShiftMax:
    """A dense 1 x 1 convolution whose only consumer is a Dynamic Shift-Max (J = 2), to be computed with a twin
    of the convolution that emits the shifted map (``pair_shift_convs``, ``portable.TwinConvShiftMax``)."""

    conv: Conv
    shift_max: ShiftMax


Op = Conv | Perm | Pointwise | Opaque | Save | Add | ShiftMax | PhaseStem | ConvShiftMax
