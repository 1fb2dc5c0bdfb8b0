"""Training configuration: every setting, the recipes that fill the unset ones (``recipes.py``), and checks.

``resolve(cfg)`` fills each ``None`` from the recipe's table; ``validate`` refuses settings that cannot work.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..data import DataConfig, default_policy
from ..data.config import DEFAULT_MAX_IMAGE_PIXELS, MAX_IMG_SIZE, is_number
from ..models import build_model, resolve_name
from .recipes import RECIPES, recipe_values


class TrainingError(ValueError):
    """A training run stopped for a reason the user can act on (the message says what to do)."""


@dataclass
class TrainConfig:
    """Every training setting. ``None`` means 'the recipe's value' (``resolve`` fills it in)."""

    model: str = "micronet_m0"
    data: str = "fashion-mnist"
    output: str = "runs/micronet_m0"
    recipe: str = "default"  # 'default' (small data, short runs) or 'paper' (the published ImageNet recipe)
    epochs: int | None = None
    batch_size: int | None = None  # global: per process = batch_size / world size
    eval_batch_size: int = 256  # per process
    lr: float | None = None  # at the given global batch size
    min_lr: float | None = None
    warmup_epochs: float | None = None
    warmup_lr: float | None = None
    opt: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    wd_all: bool | None = None  # weight decay on biases and norms too (the published recipe)
    label_smoothing: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    reprob: float = 0.0  # random erasing probability (timm RandomErasing, per image, on the device)
    clip_grad: float | None = None
    drop_rate: float | None = None
    img_size: int | None = None
    in_chans: int = 3
    hflip: float | None = None
    pad: int | None = None
    scale: tuple[float, float] | None = None
    crop_pct: float = 0.875
    amp: bool = False
    ema: bool = False
    ema_decay: float | None = None
    channels_last: bool = False
    compile: bool = False
    max_image_pixels: int | None = None  # decoding limit per image (None: PIL's; 0: none)
    dsm: str = "auto"  # Dynamic Shift-Max: auto (fused where it runs), eager, fused or compile (ops.shift_max)
    sync_bn: bool = False
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    pretrained: str | None = None
    data_root: str | None = None
    download: bool = False
    skip_bad_images: bool = False
    cache: str = "auto"
    log_interval: int = 0  # steps between plain log lines; 0: every 30 s
    threads: int | None = None
    quiet: bool = False
    model_kwargs: dict[str, Any] | None = None  # extra create_model arguments (ablation Variant fields)
    qat: bool = False  # quantization-aware fine-tuning of the int8 microcontroller graph (deploy.qat)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["scale"] is not None:
            d["scale"] = list(d["scale"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in d.items() if k in known}
        if out.get("scale") is not None:
            out["scale"] = tuple(out["scale"])
        return cls(**out)


# fields a resumed run may change without a warning (they do not change the numbers)
RUNTIME_FIELDS = {
    "dsm",
    "max_image_pixels",
    "workers",
    "device",
    "log_interval",
    "threads",
    "quiet",
    "output",
    "data",
    "data_root",
    "download",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# what a value of each annotated type may be, and what to use instead (the annotations are strings)
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "use a number"),
    "float": ((int, float), "use a number"),
    "bool": ((bool,), "use true or false"),
    "str": ((str, os.PathLike), "use a text value"),
    "None": ((type(None),), ""),
    "tuple": ((tuple, list), "use two numbers, e.g. 0.08,1"),
    "dict": ((dict,), "use a table of create_model arguments"),
}


def check_types(values: Mapping[str, Any]) -> None:
    """Each setting in ``values`` (a config, a config file's table, a checkpoint's saved config) of its type.

    ``TrainConfig``'s annotations say the types; a bool is not a number and a numeric string is not one
    either (a config file's ``"0.9"``); ``scale`` is a pair of numbers. Unknown keys are left alone.
    """
    for f in fields(TrainConfig):
        if f.name not in values:
            continue
        value, options = values[f.name], [t.strip().split("[")[0] for t in str(f.type).split("|")]
        for option in options:
            kinds, _ = _KINDS[option]
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if ok and option == "tuple":
                ok = len(value) == 2 and all(is_number(v) for v in value)
            if ok:
                break
        else:
            hint = next(_KINDS[o][1] for o in options if o != "None")
            raise TrainingError(f"{_flag(f.name)} {value!r}: {hint}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` with the recipe's value (``recipes.RECIPES``); the folder/flip and padding rules last."""
    check_types(vars(cfg))
    c = TrainConfig.from_dict(cfg.to_dict())
    try:
        spec, _ = resolve_name(cfg.model)
        c.model, dropout = spec.name, spec.dropout
    except ValueError:
        build_model(cfg.model, num_classes=2)  # a baseline / timm model, or the 'unknown model' error
        dropout = None
    if c.recipe not in RECIPES:
        raise TrainingError(f"--recipe {c.recipe!r} is unknown; use one of {', '.join(RECIPES)}")
    if c.pad is not None and c.pad < 0:
        c.pad = None  # -1: the recipe's translation
    values = recipe_values(RECIPES[c.recipe], c.model, c.epochs, c.batch_size, c.opt)
    pad_divisor = values.pop("pad_divisor")
    for name, value in values.items():
        if getattr(c, name) is None:
            setattr(c, name, value)
    if c.pad is None and pad_divisor:
        c.pad = c.img_size // pad_divisor
    c.min_lr = 0.0 if c.min_lr is None else c.min_lr
    c.warmup_lr = c.lr * 0.01 if c.warmup_lr is None else c.warmup_lr
    if c.hflip is None:
        # flips change the class of digits, letters, arrows: off for small-image folders, whose content
        # is unknown; on for the built-in datasets (clothes, objects) and ImageNet-style data
        folder = c.data.lower().replace("_", "-") not in ("fashion-mnist", "fashionmnist", "cifar10", "cifar100")
        c.hflip = 0.0 if folder and default_policy(c.img_size) == "small" else 0.5
    if c.pad is None or c.pad < 0:
        c.pad = c.img_size // 8
    c.drop_rate = dropout if c.drop_rate is None else c.drop_rate
    c.opt = c.opt.lower()
    return c


def data_config(cfg: TrainConfig) -> DataConfig:
    """The image pipeline of a resolved config (also the one recorded in its checkpoints)."""
    return DataConfig(
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        policy=default_policy(cfg.img_size),
        crop_pct=cfg.crop_pct,
        hflip=cfg.hflip,
        pad=cfg.pad,
        scale=tuple(cfg.scale),
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS if cfg.max_image_pixels is None else cfg.max_image_pixels,
    )


# the range of each numeric setting a flag, a config file or an experiment grid may set: (low, high, high
# included); low is always included, None is unbounded; a setting left at None (the recipe's, or off) passes
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "eval_batch_size": (1, None, False),
    "min_lr": (0, None, False),
    "warmup_lr": (0, None, False),
    "warmup_epochs": (0, None, False),
    "momentum": (0, 1, False),
    "weight_decay": (0, None, False),
    "label_smoothing": (0, 1, False),
    "mixup": (0, None, False),
    "cutmix": (0, None, False),
    "drop_rate": (0, 1, False),
    "hflip": (0, 1, True),
    "pad": (0, None, False),
    "crop_pct": (0.05, 1, True),
    "ema_decay": (0, 1, False),
    "max_image_pixels": (0, None, False),
    "workers": (0, None, False),
    "seed": (0, None, False),
    "log_interval": (0, None, False),
    "threads": (1, None, False),
}


def _check_ranges(cfg: TrainConfig) -> None:
    """Each numeric setting a number in its ``RANGES`` span, ``clip_grad`` above 0, ``scale`` within (0, 1]."""
    for name, (low, high, high_in) in RANGES.items():
        value, flag = getattr(cfg, name), _flag(name)
        if value is None:
            continue
        if type(value) not in (int, float):  # a bool or a file's string
            raise TrainingError(f"{flag} {value!r}: use a number")
        inside = math.isfinite(value) and value >= low and (high is None or value < high or (high_in and value == high))
        if not inside:
            span = f"{low} or more" if high is None else f"a value in [{low}, {high}{']' if high_in else ')'}"
            raise TrainingError(f"{flag} {value}: use {span}")
    clip = cfg.clip_grad
    if clip is not None and not (is_number(clip) and clip > 0):
        raise TrainingError(f"--clip-grad {clip}: the largest gradient norm must be a number above 0")
    lo, hi = cfg.scale
    if not (is_number(lo) and is_number(hi) and 0 < lo <= hi <= 1):
        raise TrainingError(f"--scale {lo},{hi}: the crop's area fractions need 0 < low <= high <= 1")


def validate(cfg: TrainConfig, world: int) -> None:
    """Reject settings that cannot work, with the flag to change."""
    check_types(vars(cfg))
    _check_ranges(cfg)
    if cfg.batch_size < 2:
        raise TrainingError(
            f"--batch-size {cfg.batch_size}: MicroNet's head ends in BatchNorm1d, which cannot train on a "
            "single image per batch; use --batch-size 2 or more (16+ trains well)"
        )
    if cfg.batch_size % world:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} is the global batch; it must divide by the {world} processes"
        )
    if cfg.batch_size // world < 2:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} over {world} processes leaves {cfg.batch_size // world} image per "
            "process; BatchNorm1d in the head needs at least 2: raise --batch-size"
        )
    if cfg.epochs < 1:
        raise TrainingError(f"--epochs {cfg.epochs}: train for at least one epoch")
    if cfg.img_size < 16:
        raise TrainingError(f"--img-size {cfg.img_size}: MicroNet downsamples 32x; use 16 or more (32 for 28-px data)")
    if cfg.img_size > MAX_IMG_SIZE:
        raise TrainingError(
            f"--img-size {cfg.img_size}: use at most {MAX_IMG_SIZE} (the largest input this package takes)"
        )
    if cfg.pad > MAX_IMG_SIZE:
        raise TrainingError(f"--pad {cfg.pad}: use at most {MAX_IMG_SIZE}")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise TrainingError(f"--lr {cfg.lr}: the learning rate must be a positive number")
    if cfg.in_chans not in (1, 3):
        raise TrainingError(f"--in-chans {cfg.in_chans}: images feed 1 (greyscale) or 3 (RGB) channels")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and (cfg.batch_size // world) % 2:
        raise TrainingError("--mixup/--cutmix need an even batch size per process")
    if not 0.0 <= cfg.reprob <= 1.0:
        raise TrainingError(f"--reprob {cfg.reprob}: random erasing is a probability; use a value in [0, 1]")
    if cfg.qat:
        _check_qat(cfg)


def _check_qat(cfg: TrainConfig) -> None:
    """``--qat`` fine-tunes the folded int8 graph of a trained float model, in float32, eagerly (``train.train``
    trains the float model first when no ``--pretrained`` is given)."""
    if not cfg.pretrained:
        raise TrainingError(
            "--qat fine-tunes a trained float model (its BatchNorm folded into the int8 graph): pass --pretrained "
            "runs/<run>/best.pt, or run micronet train --qat without it to train the float model first"
        )
    for flag, on in (("--amp", cfg.amp), ("--compile", cfg.compile), ("--sync-bn", cfg.sync_bn)):
        if on:
            raise TrainingError(f"--qat trains the int8 graph in float32 without BatchNorm, eagerly: drop {flag}")
