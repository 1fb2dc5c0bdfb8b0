"""Checkpoint bytes read with a bound: a regular file, no larger than the size limit, read once.

Every format is read through ``read_file_bounded`` before any parser sees it, so a FIFO or device is never
opened and a file larger than any checkpoint is refused by its size instead of being read into memory.
``MICRONET_MAX_CHECKPOINT_BYTES`` sets one limit for every format; without it, a PaddleClas ``.pdparams``
(the largest real one, M3's, is ~11 MB) gets a tighter bound than a PyTorch file holding a whole training
state.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

# ~6x the largest real MicroNet .pdparams (M3, ~2.6 M float32 parameters)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# PyTorch files hold a whole training state (model, EMA, optimiser) and timm models can be large
DEFAULT_MAX_TORCH_BYTES = 2 * 1024**3
MAX_BYTES_ENV = "MICRONET_MAX_CHECKPOINT_BYTES"


def max_checkpoint_bytes(max_bytes: int | None = None) -> int:
    """The size limit: ``max_bytes``, else ``$MICRONET_MAX_CHECKPOINT_BYTES``, else ``DEFAULT_MAX_BYTES``."""
    if max_bytes is not None:
        return int(max_bytes)
    env = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        return int(env)
    except ValueError:
        raise CheckpointError(f"{MAX_BYTES_ENV}={env[:40]!r} is not a whole number of bytes") from None


def file_limit() -> int:
    """The bound on a checkpoint file of any format: ``$MICRONET_MAX_CHECKPOINT_BYTES`` if set, else 2 GiB."""
    return max_checkpoint_bytes() if os.environ.get(MAX_BYTES_ENV, "").strip() else DEFAULT_MAX_TORCH_BYTES


@dataclass(frozen=True)
class Limits:
    """The bounds one read is made under: ``file`` for the file and for all tensors of a PyTorch or safetensors
    file, ``pdparams`` for a ``.pdparams`` and the tensors made from it (read once, so that a read is consistent)."""

    file: int
    pdparams: int


def limits() -> Limits:
    """The bounds in force now (``$MICRONET_MAX_CHECKPOINT_BYTES``, else the defaults)."""
    return Limits(file=file_limit(), pdparams=max_checkpoint_bytes())


def read_checkpoint_file(path: str | os.PathLike) -> tuple[bytes, Limits]:
    """A checkpoint file's bytes, bounded, with the limits they were read under (for the parsers that follow)."""
    bounds = limits()
    return read_file_bounded(Path(path), bounds.file), bounds


def read_file_bounded(path: str | os.PathLike, max_bytes: int, what: str = "checkpoint") -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a FIFO or device is refused, never opened)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise CheckpointError(
                f"{path}: {st.st_size} bytes is more than any MicroNet {what} ({max_bytes}); "
                f"raise {MAX_BYTES_ENV} if the file is yours"
            )
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: the file grew past the size limit ({max_bytes} bytes) while read")
    return data


__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_TORCH_BYTES",
    "MAX_BYTES_ENV",
    "Limits",
    "file_limit",
    "limits",
    "max_checkpoint_bytes",
    "read_checkpoint_file",
    "read_file_bounded",
]
