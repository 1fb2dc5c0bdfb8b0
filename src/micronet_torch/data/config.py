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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .._env import SMALL_IMAGE_MAX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_MAX = SMALL_IMAGE_MAX  # img sizes up to this use the small-image pipeline
# the largest input size anything accepts (flags, checkpoints, exported files' metadata and graphs, resumed
# configs): 2048 px is 9x the 224 px MicroNet is made for; an image batch at it is ~50 MB of float input
MAX_IMG_SIZE = 2048
# the most pixels (images x height x width) an evaluation batch holds: 2^24, 334 images at 224 px, 4 at 2048 px;
# ``micronet eval`` / ``predict`` lower the batch size to it, so memory does not grow with the input size
MAX_BATCH_PIXELS = 1 << 24
# PIL's default limit (~89 M pixels, a 9459 x 9459 image): far above any photo a classifier is trained on
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


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
    # reading: images with more pixels are refused as decompression bombs (0: no limit); PIL's default.
    # A limit of the machine that reads, not of the model: never taken from a file (see from_dict)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def to_dict(self) -> dict[str, Any]:
        """What a checkpoint records: the preprocessing (not the reading limit, which is the reader's)."""
        d = asdict(self)
        d["mean"], d["std"], d["scale"] = list(self.mean), list(self.std), list(self.scale)
        d.pop("max_image_pixels")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """The config a checkpoint or file metadata records, checked (``DataError`` names the bad field).

        The values come from files other people made: each must be of its type and in a sane range, so a
        file cannot make evaluation allocate a 10^9-pixel input. ``max_image_pixels`` is never read from a file.
        """
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "max_image_pixels"}
        for key in ("mean", "std", "scale"):
            if key in known:
                if not isinstance(known[key], (list, tuple)):
                    raise DataError(f"data config {key} is not a list of numbers")
                known[key] = tuple(known[key])
        cfg = cls(**known)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``DataError`` naming the first field that is of the wrong type or out of range."""
        checks = (
            ("img_size", type(self.img_size) is int and 1 <= self.img_size <= MAX_IMG_SIZE),
            ("in_chans", type(self.in_chans) is int and 1 <= self.in_chans <= 64),
            ("policy", self.policy in ("small", "crop")),
            ("crop_pct", is_number(self.crop_pct) and 0.05 <= self.crop_pct <= 1.0),
            ("mean", 1 <= len(self.mean) <= 64 and all(is_number(v) for v in self.mean)),
            ("std", 1 <= len(self.std) <= 64 and all(is_number(v) and v > 0 for v in self.std)),
            ("hflip", is_number(self.hflip) and 0.0 <= self.hflip <= 1.0),
            ("pad", type(self.pad) is int and -1 <= self.pad <= MAX_IMG_SIZE),
            ("scale", len(self.scale) == 2 and all(is_number(v) and 0 < v <= 1 for v in self.scale)),
            ("max_image_pixels", type(self.max_image_pixels) is int and self.max_image_pixels >= 0),
        )
        for name, ok in checks:
            if not ok:
                raise DataError(f"data config {name}={str(getattr(self, name))[:60]} is not valid")

    @property
    def padding(self) -> int:
        return self.img_size // 8 if self.pad < 0 else self.pad

    @property
    def resize_size(self) -> int:
        return math.floor(self.img_size / self.crop_pct)


def channel_stats(values: Sequence[float], chans: int) -> list[float]:
    """A per-channel mean or std for ``chans`` channels, as the image pipeline normalizes with it: as it is when the
    lengths match, averaged for one channel, repeated from one value, else cut to the first ``chans``."""
    values = list(values)
    if len(values) == chans:
        return values
    if chans == 1:
        return [sum(values) / len(values)]
    return (values * chans)[:chans] if len(values) == 1 else values[:chans]


def is_number(v: Any) -> bool:
    """A finite int or float (no bool, no numeric string): what a setting read from a file must be."""
    return type(v) in (int, float) and math.isfinite(v)


def default_policy(img_size: int) -> str:
    return "small" if img_size <= SMALL_MAX else "crop"
