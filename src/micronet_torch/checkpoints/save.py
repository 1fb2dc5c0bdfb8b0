"""A model's weights → a clean ``.safetensors`` that records what evaluating them needs, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from .._fs import atomic_write
from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY


def save_safetensors(
    model_or_sd: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    model_name: str,
    *,
    data_config: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a clean ``.safetensors`` (no ``module.`` prefix, no buffers that are not saved) atomically.

    The metadata records what evaluating the weights needs besides them, so that ``load_model`` sees images
    as the original checkpoint did: the model and its arguments, the input size and preprocessing
    (``data_config``: ``DataConfig.to_dict()``), and the class names, each as JSON. Missing parent folders
    are created; a write that fails (no permission, full disk) leaves nothing behind: not the file, not a
    temporary file, not a folder it created.
    """
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    head = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    meta = {"model": model_name, "format": "micronet-torch"}
    if head is not None:
        meta["num_classes"] = str(head.shape[0])
    if STEM_CONV_KEY in sd:
        meta["in_chans"] = str(sd[STEM_CONV_KEY].shape[1])
    if data_config:
        meta["data_config"] = json.dumps(dict(data_config))
        meta["img_size"] = str(data_config.get("img_size", ""))
    if class_names:
        meta["class_names"] = json.dumps([str(c) for c in class_names])
    if model_kwargs:
        meta["model_kwargs"] = json.dumps(dict(model_kwargs))
    payload = save(sd, metadata=meta)
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda out: out.write(payload))
    except BaseException:
        for folder in created:  # innermost first; only the empty folders this call made
            try:
                folder.rmdir()
            except OSError:
                break
        raise


__all__ = ["save_safetensors"]
