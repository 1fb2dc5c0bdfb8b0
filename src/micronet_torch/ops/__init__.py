"""MicroNet's operators, usable in any network: micro-factorized convolutions, Dynamic Shift-Max, shuffles."""

from .factorized import (
    DepthwiseConvBN,
    GroupConvBN,
    MicroFactorizedDepthwise,
    MicroFactorizedPointwise,
    group_adaptive_groups,
)
from .shift_max import (
    IMPLS,
    DynamicShiftMax,
    SqueezeExcite,
    set_shift_max_impl,
    shift_index,
    shift_max_fusion,
    squeeze_channels,
    use_shift_max_impl,
)
from .shuffle import (
    ChannelShuffle,
    channel_shuffle,
    compose_permutations,
    invert_permutation,
    shuffle_permutation,
)

__all__ = [
    "IMPLS",
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
    "set_shift_max_impl",
    "shift_index",
    "shift_max_fusion",
    "shuffle_permutation",
    "squeeze_channels",
    "use_shift_max_impl",
]
