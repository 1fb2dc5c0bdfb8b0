"""Evaluating a checkpoint: top-1, top-5, loss and count over a class-folder tree or a built-in test split.

The model comes from ``models.load_model`` (any supported file), the images through exactly the
evaluation transform the file records, and the loop is training's own (``train.metrics.evaluate``), so
``micronet eval`` of ``best.pt`` repeats the number training printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._env import default_threads, default_workers, pick_device
from ..data import build_eval_loader
from ..data.config import MAX_BATCH_PIXELS, MAX_IMG_SIZE
from ..deploy.qat import with_qat
from ..models import CheckpointError, LoadedModel, load_model
from ..runtime.exported import open_exported
from ..runtime.targets import TARGETS, target_of_file
from ..train.metrics import evaluate

ONNX_SUFFIXES = (".onnx",)


class EvalError(CheckpointError):
    """A checkpoint or data set that does not fit; the message says which and what to do."""


def describe_file(path: str | os.PathLike) -> str:
    """What a file looks like from its first bytes, for the 'not a checkpoint' message."""
    path = Path(path)
    head = path.read_bytes()[:64] if path.is_file() else b""
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that is not a PyTorch checkpoint"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")):
        return "an image"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data ({path.stat().st_size} bytes)"
    first = text.splitlines()[0][:40] if text.strip() else ""
    return f"a text file (starting {first!r})"


def is_onnx_file(path: str | os.PathLike) -> bool:
    """An ``.onnx`` file (by its suffix; ONNX files carry no magic number)."""
    return Path(path).suffix.lower() in ONNX_SUFFIXES


def open_model(
    checkpoint: str | os.PathLike,
    model: str | None = None,
    img_size: int | None = None,
    device: torch.device | str = "cpu",
    threads: int = 1,
) -> LoadedModel:
    """Any file ``micronet eval`` / ``predict`` take: a checkpoint (``models.load_model``) or a file ``micronet
    export`` wrote, in any format (``.onnx`` fp32 / int8 / ``--fused-ops``, ``.xml``, ``.pte``, ``.tflite``,
    ``.param``, ``.ts``, ``.pt2``), run by its own runtime on the CPU with the preprocessing of its metadata.

    A file that is neither stops with "not a checkpoint this package reads: <what it looks like>".
    """
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: give a file in it (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if img_size is not None and not 1 <= img_size <= MAX_IMG_SIZE:
        raise ValueError(f"--img-size {img_size}: the input size must be 1 to {MAX_IMG_SIZE} px")
    target = target_of_file(path)
    if target is not None:
        if model:
            print(f"note: {path} is an exported {target.name} file; --model {model} is not needed and ignored")
        if torch.device(device).type != "cpu":
            print(f"note: {path} runs in {target.runtime} on the CPU")
        return open_exported(path, img_size, threads)
    try:
        return with_qat(load_model(path, model, img_size, device))
    except CheckpointError as err:
        if "not readable" not in str(err):
            raise
        raise CheckpointError(
            f"{path} is not readable: not a checkpoint this package reads: {describe_file(path)}"
        ) from err
    except (KeyError, IndexError, TypeError, AttributeError) as err:  # a pickle-free file of another kind
        raise CheckpointError(
            f"{path} is not readable: not a checkpoint this package reads: {describe_file(path)}"
        ) from err


def pixel_batch(batch_size: int, img_size: int) -> int:
    """``batch_size`` lowered so that a batch holds at most ``MAX_BATCH_PIXELS`` pixels (at least one image)."""
    return max(1, min(batch_size, MAX_BATCH_PIXELS // (img_size * img_size)))


def check_classes(loaded: LoadedModel, data_classes: list[str], data: str) -> None:
    """The data's classes must be the checkpoint's: same count, and the same names for our checkpoints."""
    n_model, n_data = len(loaded.class_names), len(data_classes)
    if n_model != n_data:
        raise EvalError(
            f"the checkpoint's model has {n_model} classes but {data} has {n_data}; evaluate it on data "
            "with the classes it was trained on (or fine-tune it with micronet train --pretrained)"
        )
    named = loaded.source == "training" or "class_names" in loaded.info.get("metadata", {})
    if named and list(loaded.class_names) != list(data_classes):
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
    loaded = open_model(checkpoint, model, img_size, dev, threads=threads or 1)
    if loaded.source in TARGETS:  # an exported file, run by its runtime on the CPU
        dev = torch.device("cpu")
    batch_size = pixel_batch(batch_size, loaded.data_config.img_size)
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
