"""Training checkpoints: atomic writes (temporary file, fsync, rename) and safe reads (weights_only).

A checkpoint is a plain dict of tensors, dicts, lists, strings and numbers, so ``torch.load`` with
``weights_only=True`` reads it without running pickled code. A crash while writing leaves the
previous file intact: the new one replaces it only once it is complete on disk.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fs import atomic_write
from ..models.weights import CheckpointError, is_training_checkpoint, read_checkpoint

__all__ = [
    "CheckpointError",
    "atomic_write",
    "clean_state_dict",
    "is_training_checkpoint",
    "load",
    "remove_stale_temporaries",
    "rng_state",
    "save_atomic",
    "set_rng_state",
]

CheckpointFileError = CheckpointError  # the name before 0.2


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what an ``atomic_write`` killed mid-write (SIGKILL, power loss) left behind: ``.<name>.*.tmp``.

    Called when a run starts or resumes in ``folder`` (one writer per run folder), so the files of a
    finished write are never touched; returns the removed paths.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def save_atomic(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (see ``atomic_write``).

    Serialised in memory first: ``torch.save`` writing to a file turns a full disk or a file-size limit into a
    ``RuntimeError`` (``unexpected pos``); written as bytes, it stays the ``OSError`` that names the file.
    """
    buf = io.BytesIO()
    torch.save(dict(obj), buf)
    return atomic_write(path, lambda fh: fh.write(buf.getbuffer()))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU (``models.weights.read_checkpoint``)."""
    return read_checkpoint(path)


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies without the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for key, value in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value.detach().cpu().clone()
    return out


# ---- random number generator states ------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states in a weights_only-safe form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
