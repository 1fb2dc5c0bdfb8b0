"""Training recipes as data: each a table of values that ``config.resolve`` gives every setting left unset.

To add a recipe, add a ``Recipe`` to ``RECIPES``; ``--recipe NAME`` then selects it. ``per_model`` overrides
apply to models whose name ends with the key (the published recipe trains M3 differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

# optimisers whose step size does not scale with the gradient (their lr and weight decay are set apart)
ADAPTIVE_OPTIMIZERS = ("adamw", "adam", "nadamw", "lamb", "lion", "adan")


@dataclass(frozen=True)
class Recipe:
    """The values of one recipe. ``lr`` is the peak rate at ``lr_batch`` images, scaled to the batch size
    ``linear``-ly or by its square root (``sqrt``); ``*_adaptive`` hold the values for adaptive optimisers."""

    name: str
    about: str
    epochs: int
    batch_size: int
    opt: str
    lr: float
    lr_batch: int
    lr_scaling: str
    weight_decay: float
    wd_all: bool
    label_smoothing: float
    img_size: int
    scale: tuple[float, float]
    ema_decay: float
    lr_adaptive: float | None = None
    weight_decay_adaptive: float | None = None
    warmup_epochs: float | None = None  # None: 10 % of the epochs, at most 2
    pad_divisor: int | None = None  # small images: translation of img_size // pad_divisor px (None: 8)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        name="default",
        about="small data, short runs on small images (measured on 4,000 28-px digits and Fashion-MNIST)",
        epochs=15,
        batch_size=128,
        opt="adamw",
        lr=0.1,
        lr_adaptive=4e-3,  # AdamW 4e-3 at batch 64, square-root scaling
        lr_batch=64,
        lr_scaling="sqrt",
        weight_decay=5e-5,
        weight_decay_adaptive=0.05,
        wd_all=False,
        label_smoothing=0.0,  # it cost 1-2 points
        img_size=32,
        scale=(0.25, 1.0),
        ema_decay=0.998,
        pad_divisor=16,  # 2 px at 32: 4 px cost 1 point
    ),
    "paper": Recipe(
        name="paper",
        about="the published ImageNet recipe (paper_facts.md): SGD 0.9, lr 0.1 per 256 images, cosine, 600 epochs",
        epochs=600,
        batch_size=256,
        opt="momentum",
        lr=0.1,
        lr_batch=256,
        lr_scaling="linear",
        weight_decay=3e-5,
        wd_all=True,
        label_smoothing=0.0,
        img_size=224,
        scale=(0.08, 1.0),
        ema_decay=0.9998,
        warmup_epochs=0.0,
        per_model={"m3": dict(batch_size=512, warmup_epochs=5.0, weight_decay=4e-5)},  # 4 GPUs, with warm-up
    ),
}
# --qat: the default recipe, short and slow (fine-tuning a trained float model, no warm-up)
RECIPES["qat"] = replace(
    RECIPES["default"],
    name="qat",
    about="quantization-aware fine-tuning (--qat) of a trained float model: a few epochs at a small rate",
    epochs=3,
    lr=0.005,
    lr_adaptive=1e-4,
    weight_decay_adaptive=0.01,
    warmup_epochs=0.0,
)


def paper_weight_decay(model: str) -> float:
    """The published weight decay of ``model``: 4e-5 for M3, 3e-5 for the others."""
    return recipe_values(RECIPES["paper"], model, None, None, None)["weight_decay"]


def recipe_values(
    recipe: Recipe, model: str, epochs: int | None, batch_size: int | None, opt: str | None
) -> dict[str, Any]:
    """The settings ``recipe`` gives ``model``, given the epochs, batch size and optimiser already chosen (or None)."""
    values: dict[str, Any] = dict(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        opt=recipe.opt,
        weight_decay=recipe.weight_decay,
        wd_all=recipe.wd_all,
        warmup_epochs=recipe.warmup_epochs,
        label_smoothing=recipe.label_smoothing,
        img_size=recipe.img_size,
        scale=recipe.scale,
        ema_decay=recipe.ema_decay,
    )
    for suffix, overrides in recipe.per_model.items():
        if model.endswith(suffix):
            values.update(overrides)
    epochs = values["epochs"] if epochs is None else epochs
    batch = values["batch_size"] if batch_size is None else batch_size
    adaptive = (opt or values["opt"]).lower() in ADAPTIVE_OPTIMIZERS
    base = recipe.lr_adaptive if adaptive and recipe.lr_adaptive is not None else recipe.lr
    ratio = batch / recipe.lr_batch
    values["lr"] = base * (math.sqrt(ratio) if recipe.lr_scaling == "sqrt" else ratio)
    if adaptive and recipe.weight_decay_adaptive is not None:
        values["weight_decay"] = recipe.weight_decay_adaptive
    if values["warmup_epochs"] is None:
        values["warmup_epochs"] = min(2.0, 0.1 * epochs)
    values["pad_divisor"] = recipe.pad_divisor
    return values


# ``micronet demo`` (the README's first command): MicroNet-M0 on Fashion-MNIST at 32 px, the default recipe
DEMO: dict[str, Any] = dict(model="micronet_m0", data="fashion-mnist", img_size=32, batch_size=128, epochs=12)
