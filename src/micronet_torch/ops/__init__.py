"""MicroNet's operators, usable in any network: micro-factorized convolutions, Dynamic Shift-Max, shuffles."""

from .factorized import (
    DepthwiseConvBN,
    GroupConvBN,
    MicroFactorizedDepthwise,
    MicroFactorizedPointwise,
    group_adaptive_groups,
)
from .shift_max import DynamicShiftMax, SqueezeExcite, shift_index, squeeze_channels
from .shuffle import (
    ChannelShuffle,
    channel_shuffle,
    compose_permutations,
    invert_permutation,
    shuffle_permutation,
)

__all__ = [
    "ChannelShuffle",
    "DepthwiseConvBN",
    "DynamicShiftMax",
    "GroupConvBN",
    "MicroFactorizedDepthwise",
    "MicroFactorizedPointwise",
    "SqueezeExcite",
    "channel_shuffle",
    "compose_permutations",
    "group_adaptive_groups",
    "invert_permutation",
    "shift_index",
    "shuffle_permutation",
    "squeeze_channels",
]
