"""Exported files as models for ``micronet eval`` / ``predict``: every target's file, run by its own runtime.

``open_exported(path)`` picks the target by the file's suffix (``targets.target_of_file``), reads the metadata
the export wrote (``Target.read_metadata``), runs the file with the target's loader behind an ``nn.Module``
call, and checks before any image is read that the graph takes the input its metadata declares and returns one
row of logits per image. Every problem is a ``CheckpointError`` line naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import DataConfig, DataError, default_policy
from ..data.config import MAX_IMG_SIZE
from ..models import CheckpointError, LoadedModel, published_data_config
from ..models.errors import one_line
from .metadata import data_config_from_metadata
from .targets import TARGETS, Target, target_of_file


class RuntimeModel(nn.Module):
    """An exported file run by its runtime behind the ``nn.Module`` call of a PyTorch model (CPU, float32)."""

    def __init__(self, path: Path, target: Target, run: Any) -> None:
        super().__init__()
        self.path, self.target, self.run = path, target, run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(np.ascontiguousarray(self.run(x), dtype=np.float32))


def _fail(path: Path, what: str, err: BaseException | None = None) -> CheckpointError:
    return CheckpointError(f"{path}: {what}" + (f" ({one_line(err, 200)})" if err is not None else ""))


def _config(path: Path, target: Target, meta: dict[str, str], declared: list[Any] | None) -> DataConfig:
    """The preprocessing the file records; for a file without it (exported elsewhere), the published transform at
    the graph's declared size, with a warning."""
    try:
        dcfg = data_config_from_metadata(meta)
    except (DataError, ValueError, TypeError) as err:
        raise _fail(path, "its metadata's data_config is not valid", err) from err
    if dcfg is not None:
        return dcfg
    if declared is None:
        raise _fail(path, f"carries no micronet-torch metadata; export it with micronet export --format {target.name}")
    size = declared[-1] if isinstance(declared[-1], int) else None
    chans = declared[1] if isinstance(declared[1], int) else 3
    if size is not None and not 1 <= size <= MAX_IMG_SIZE:
        raise _fail(path, f"its graph takes {size} px inputs; the largest input size is {MAX_IMG_SIZE}")
    if not 1 <= chans <= 64:
        raise _fail(path, f"its graph takes {chans} input channels, not an image")
    dcfg = published_data_config(size, chans)
    print(
        f"warning: {path} carries no micronet-torch metadata; assuming {dcfg.img_size} px, ImageNet mean/std "
        "and the published resize/crop",
        file=sys.stderr,
    )
    return dcfg


def open_exported(path: str | os.PathLike, img_size: int | None = None, threads: int = 1) -> LoadedModel:
    """An exported file (``.onnx``, ``.xml``, ``.pte``, ``.tflite``, ``.param``, ``.ts``, ``.pt2``) as a
    ``LoadedModel`` run by its runtime, with the class names and preprocessing its metadata records."""
    path = Path(path)
    target = target_of_file(path)
    if target is None:
        raise _fail(path, "not an exported file (" + ", ".join(t.suffix for t in TARGETS.values()) + ")")
    missing = target.missing(run_only=True)
    if missing:
        raise _fail(path, missing)
    try:
        run = target.load(path, threads)
    except ImportError as err:
        raise _fail(path, f"running it needs its runtime: pip install micronet-torch[{target.extra}]", err) from err
    except Exception as err:
        raise _fail(path, f"{target.runtime} cannot load it", err) from err
    try:
        meta = target.read_metadata(path)
        declared = target.input_shape(path) if target.input_shape is not None else None
    except Exception as err:
        raise _fail(path, "its metadata cannot be read", err) from err
    if declared is not None and len(declared) != 4:
        raise _fail(path, f"its input has shape {declared}, not an image batch (N, C, H, W)")
    dcfg = _config(path, target, meta, declared)
    fixed = declared[-1] if declared is not None and isinstance(declared[-1], int) else None
    if target.fixed_shape and fixed is None:
        fixed = dcfg.img_size
    if img_size and img_size != dcfg.img_size:
        if fixed is not None:
            raise ValueError(f"--img-size {img_size}: {path} takes {fixed} px inputs only")
        dcfg.img_size, dcfg.policy = img_size, default_policy(img_size)
    if not 1 <= dcfg.img_size <= MAX_IMG_SIZE:
        raise ValueError(f"--img-size {dcfg.img_size}: the largest input size is {MAX_IMG_SIZE}")
    model = RuntimeModel(path, target, run)
    n_cls = _probe(path, model, dcfg)
    names = _class_names(path, meta, n_cls)
    name = meta.get("model_name", path.stem)
    return LoadedModel(model.eval(), name, dcfg, names, target.name, {"metadata": meta})


def _probe(path: Path, model: RuntimeModel, dcfg: DataConfig) -> int:
    """Run one blank image of the recorded size: the graph must take it and give (1, classes) logits."""
    x = torch.zeros(1, dcfg.in_chans, dcfg.img_size, dcfg.img_size)
    try:
        out = model(x)
    except Exception as err:
        raise _fail(
            path,
            f"its graph does not take the {dcfg.in_chans}x{dcfg.img_size}x{dcfg.img_size} input its metadata declares",
            err,
        ) from err
    if out.ndim != 2 or out.shape[0] != 1:
        raise _fail(path, f"its output has shape {tuple(out.shape)} for one image, not (1, classes) logits")
    return int(out.shape[1])


def _class_names(path: Path, meta: dict[str, str], n_cls: int) -> list[str]:
    try:
        names = json.loads(meta.get("class_names", "[]"))
    except ValueError as err:
        raise _fail(path, "its metadata's class_names is not JSON", err) from err
    if names == []:  # exported without a training checkpoint: no names recorded
        return [f"class_{i}" for i in range(n_cls)]
    if not isinstance(names, list) or len(names) != n_cls:
        count = len(names) if isinstance(names, list) else "no list of"
        raise _fail(path, f"its metadata names {count} classes but the graph outputs {n_cls}")
    return [str(c) for c in names]
