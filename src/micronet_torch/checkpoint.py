"""Training checkpoints: atomic writes (temporary file, fsync, rename) and safe reads (weights_only).

A checkpoint is a plain dict of tensors, dicts, lists, strings and numbers, so ``torch.load`` with
``weights_only=True`` reads it without running pickled code. A crash while writing leaves the
previous file intact: the new one replaces it only once it is complete on disk.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

# keys every training checkpoint holds (the contract with ``weights.py`` and ``micronet eval``)
REQUIRED_KEYS = ("model", "model_name", "num_classes", "in_chans", "img_size", "class_names")


class CheckpointFileError(ValueError):
    """A checkpoint that is missing, unreadable or not a training checkpoint; the message says which."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file atomically: ``write(fh)`` into a temporary file in the same folder, fsync, rename.

    A crash or interrupt at any moment leaves either the old file or the complete new one, never a
    half-written file; the temporary file is removed on failure.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


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
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda fh: torch.save(dict(obj), fh))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` onto the CPU; clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFileError(
            f"checkpoint {path} holds objects other than tensors and plain containers; refusing to "
            f"unpickle it ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointFileError(
            f"checkpoint {path} is not readable (truncated or not a PyTorch file): {err}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointFileError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def is_training_checkpoint(obj: Mapping[str, Any]) -> bool:
    """True for this project's ``last.pt`` / ``best.pt`` (as opposed to published weights files)."""
    return all(k in obj for k in REQUIRED_KEYS) and isinstance(obj.get("model"), Mapping)


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
