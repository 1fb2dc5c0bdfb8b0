"""How images become model inputs (``DataConfig``, recorded in checkpoints) and the package's data error.

Two evaluation transforms exist and are recorded in checkpoints so that ``micronet eval`` and ``micronet
predict`` apply exactly what training evaluated:

- ``small`` (images of at most 64 px): resize the whole image to ``img_size`` x ``img_size``;
  training adds random translation (zero padding + random crop) and horizontal flips on tensors.
- ``crop`` (ImageNet style): resize the shorter side to ``img_size / crop_pct``, centre crop;
  training uses torchvision's ``RandomResizedCrop`` + flip per image in DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .._env import SMALL_IMAGE_MAX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_MAX = SMALL_IMAGE_MAX  # img sizes up to this use the small-image pipeline


class DataError(ValueError):
    """A data problem the user can fix; the message names the folder, file or flag."""


@dataclass
class DataConfig:
    """How images become model inputs; stored in checkpoints so evaluation repeats it exactly."""

    img_size: int = 32
    in_chans: int = 3
    policy: str = "small"  # 'small' (resize whole image) or 'crop' (resize shorter side, centre crop)
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # training-only augmentation
    hflip: float = 0.5
    pad: int = -1  # small policy: translation in px (-1: img_size // 8)
    scale: tuple[float, float] = (0.08, 1.0)  # crop policy: RandomResizedCrop area range

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["scale"] = list(self.mean), list(self.std), list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "scale"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @property
    def padding(self) -> int:
        return self.img_size // 8 if self.pad < 0 else self.pad

    @property
    def resize_size(self) -> int:
        return math.floor(self.img_size / self.crop_pct)


def default_policy(img_size: int) -> str:
    return "small" if img_size <= SMALL_MAX else "crop"
