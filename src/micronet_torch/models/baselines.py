"""Baselines for the paper's comparisons: MobileNetV3-Small at any width, matched to a MicroNet's MAdds.

timm builds MobileNetV3-Small only at its registered widths (0.5, 0.75, 1.0); the paper compares at
equal MAdds, which needs any width multiplier; ``registry.build_model`` builds them by name
(``mobilenetv3_small_w<width>``) beside MicroNets and every other timm model.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from .profile import profile_model

MNV3_SMALL = re.compile(r"^mobilenetv3_small_w(\d+(?:\.\d+)?)$")


def mobilenetv3_small(width: float, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """timm's MobileNetV3-Small with channel multiplier ``width`` (its own recipe otherwise)."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    if not 0.05 <= width <= 4:
        raise ValueError(f"MobileNetV3-Small width {width} is outside 0.05..4")
    return _gen_mobilenet_v3(
        "mobilenetv3_small_100", width, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def baseline_name(width: float) -> str:
    """The model name of MobileNetV3-Small at ``width`` (for instance ``mobilenetv3_small_w0.35``)."""
    return f"mobilenetv3_small_w{width:g}"


def match_width(target_madds: int, img_size: int, num_classes: int, tolerance: float = 0.10) -> tuple[float, int]:
    """The MobileNetV3-Small width (in steps of 0.01) whose MAdds at ``img_size`` are closest to the target.

    Raises when even the closest is off by more than ``tolerance`` (relative).
    """
    cache: dict[float, int] = {}

    def madds(width: float) -> int:
        if width not in cache:
            cache[width] = profile_model(mobilenetv3_small(width, num_classes=num_classes), img_size).madds
        return cache[width]

    lo, hi = 0.05, 4.0  # MAdds grow with width: bisect on a 0.01 grid, then take the nearer neighbour
    lo_i, hi_i = round(lo * 100), round(hi * 100)
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        if madds(mid / 100) < target_madds:
            lo_i = mid
        else:
            hi_i = mid
    best = min((lo_i / 100, hi_i / 100), key=lambda w: abs(madds(w) - target_madds))
    if abs(madds(best) - target_madds) > tolerance * target_madds:
        raise ValueError(
            f"no MobileNetV3-Small width matches {target_madds / 1e6:.3f} M MAdds at {img_size}px within "
            f"{tolerance:.0%} (closest: width {best}, {madds(best) / 1e6:.3f} M)"
        )
    return best, madds(best)
