"""Evaluating a checkpoint: top-1, top-5, loss and count over a class-folder tree or a built-in test split.

The model comes from ``models.load_model`` (any supported file), the images through exactly the
evaluation transform the file records, and the loop is training's own (``train.metrics.evaluate``), so
``micronet eval`` of ``best.pt`` repeats the number training printed.
"""

from __future__ import annotations

from typing import Any

import torch

from .._env import default_threads, default_workers, pick_device
from ..data import build_eval_loader
from ..models import CheckpointError, LoadedModel, load_model
from ..train.metrics import evaluate


class EvalError(CheckpointError):
    """A checkpoint or data set that does not fit; the message says which and what to do."""


def check_classes(loaded: LoadedModel, data_classes: list[str], data: str) -> None:
    """The data's classes must be the checkpoint's: same count, and the same names for our checkpoints."""
    n_model, n_data = len(loaded.class_names), len(data_classes)
    if n_model != n_data:
        raise EvalError(
            f"the checkpoint's model has {n_model} classes but {data} has {n_data}; evaluate it on data "
            "with the classes it was trained on (or fine-tune it with micronet train --pretrained)"
        )
    if loaded.source == "training" and list(loaded.class_names) != list(data_classes):
        diff = [(a, b) for a, b in zip(loaded.class_names, data_classes, strict=True) if a != b][:3]
        raise EvalError(
            f"the checkpoint's classes differ from those of {data}, e.g. "
            + ", ".join(f"{a!r} vs {b!r}" for a, b in diff)
            + "; class folders must be named as in training"
        )


def evaluate_checkpoint(
    checkpoint: str,
    data: str = "fashion-mnist",
    model: str | None = None,
    img_size: int | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    data_root: str | None = None,
    download: bool = False,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``data``; returns top1, top5, loss, n and what was evaluated."""
    dev = pick_device(device)
    loaded = load_model(checkpoint, model, img_size, dev)
    torch.set_num_threads(threads or default_threads(loaded.data_config.img_size))
    loader, data_classes, desc = build_eval_loader(
        data,
        loaded.data_config,
        batch_size,
        workers if workers is not None else default_workers(),
        data_root=data_root,
        download=download,
        skip_bad=skip_bad_images,
        device=dev,
    )
    check_classes(loaded, data_classes, data)
    result = evaluate(loaded.model, loader, loaded.data_config, dev)
    return {
        "top1": result["top1"],
        "top5": result["top5"],
        "loss": result["loss"],
        "n": result["n"],
        "model": loaded.name,
        "checkpoint": str(checkpoint),
        "data": desc,
        "img_size": loaded.data_config.img_size,
        "skipped": getattr(loader, "skipped", 0),
    }
