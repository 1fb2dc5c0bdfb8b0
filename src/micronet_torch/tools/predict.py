"""Prediction: the top-k classes, with probabilities, of each image given.

Class names come from the checkpoint (training checkpoints record them); published 1000-class
weights use ImageNet's names. Images go through the checkpoint's own evaluation transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import DataError, eval_pixels, normalize, open_image
from ..models import LoadedModel


@torch.no_grad()
def predict_images(loaded: LoadedModel, images: list[str], topk: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
    """Top-``topk`` (class name, probability) per image, in the order given."""
    dcfg = loaded.data_config
    device = next(loaded.model.parameters()).device
    k = min(topk, len(loaded.class_names))
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        paths = images[start : start + batch_size]
        pixels = []
        for p in paths:
            if not Path(p).is_file():
                raise DataError(f"image {p} does not exist")
            pixels.append(eval_pixels(open_image(p, 1 if dcfg.in_chans == 1 else 3), dcfg))
        chans = max(x.shape[0] for x in pixels)
        x = torch.stack([t.expand(chans, -1, -1) for t in pixels]).to(device)
        probs = loaded.model(normalize(x, dcfg)).float().softmax(1)
        top = probs.topk(k, dim=1)
        for p, values, indices in zip(paths, top.values.tolist(), top.indices.tolist(), strict=True):
            results.append(
                {
                    "image": p,
                    "top": [
                        {"class": loaded.class_names[i], "index": i, "probability": v}
                        for v, i in zip(values, indices, strict=True)
                    ],
                }
            )
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        lines.extend(f"  {t['probability'] * 100:6.2f}%  {t['class']}" for t in r["top"])
    return "\n".join(lines)
