"""Prediction: the top-k classes, with probabilities, of each image given (files, folders, glob patterns).

Class names come from the checkpoint (training checkpoints and exported files record them); published
1000-class weights use ImageNet's names. Images go through the file's own evaluation transform. An
unreadable or missing image is reported on its own and never stops the others.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch

from .._text import MESSAGE_LIMIT, PATH_LIMIT, one_line, printable
from ..data import IMG_EXTENSIONS, DataError, eval_pixels, normalize, open_image
from ..data.config import MAX_BATCH_PIXELS
from ..models import LoadedModel


def expand_images(inputs: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Files as given, folders as the images under them (sorted), glob patterns as their matches.

    Returns the image paths and one error entry (``{"image", "error"}``) per input that names nothing.
    """
    images: list[str] = []
    errors: list[dict[str, Any]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                errors.append({"image": item, "error": f"folder {item} holds no images ({', '.join(IMG_EXTENSIONS)})"})
            images.extend(found)
        elif path.exists():
            images.append(item)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append({"image": item, "error": f"no file matches {item}"})
            images.extend(found)
        else:
            errors.append({"image": item, "error": f"image {item} does not exist"})
    return images, errors


def _device(model: torch.nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_images(loaded: LoadedModel, images: list[str], topk: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
    """Top-``topk`` (class name, probability) per image, in the order given (folders and globs expanded).

    An image that cannot be read gets ``{"image": path, "error": message}`` in its place; the others are
    predicted all the same.
    """
    dcfg = loaded.data_config
    device = _device(loaded.model)
    batch_size = max(1, min(batch_size, MAX_BATCH_PIXELS // (dcfg.img_size * dcfg.img_size)))
    k = min(topk, len(loaded.class_names))
    paths, missing = expand_images(images)
    results: list[dict[str, Any]] = list(missing)
    for start in range(0, len(paths), batch_size):
        good, pixels = [], []
        for p in paths[start : start + batch_size]:
            try:
                pixels.append(eval_pixels(open_image(p, 1 if dcfg.in_chans == 1 else 3, dcfg.max_image_pixels), dcfg))
                good.append(p)
            except (DataError, OSError) as err:
                results.append({"image": p, "error": str(err)})
        if not good:
            continue
        chans = max(x.shape[0] for x in pixels)
        x = torch.stack([t.expand(chans, -1, -1) for t in pixels]).to(device)
        probs = loaded.model(normalize(x, dcfg)).float().softmax(1)
        top = probs.topk(k, dim=1)
        for p, values, indices in zip(good, top.values.tolist(), top.indices.tolist(), strict=True):
            results.append(
                {
                    "image": p,
                    "top": [
                        {"class": loaded.class_names[i], "index": i, "probability": v}
                        for v, i in zip(values, indices, strict=True)
                    ],
                }
            )
    order = {p: i for i, p in enumerate(dict.fromkeys([*(e["image"] for e in missing), *paths]))}
    results.sort(key=lambda r: order.get(r["image"], len(order)))
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    """The good predictions as text (errors are reported separately, ``format_errors``)."""
    lines = []
    for r in results:
        if "top" not in r:
            continue
        lines.append(printable(r["image"], PATH_LIMIT))  # file and class names printed escaped (``_text``)
        lines.extend(f"  {t['probability'] * 100:6.2f}%  {printable(t['class'])}" for t in r["top"])
    return "\n".join(lines)


def format_errors(results: list[dict[str, Any]]) -> list[str]:
    """One line per image that could not be predicted (escaped: file names may hold anything)."""
    return [
        one_line(r["error"] if r["image"] in r["error"] else f"{r['image']}: {r['error']}", MESSAGE_LIMIT)
        for r in results
        if "error" in r
    ]
