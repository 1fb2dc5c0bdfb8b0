"""The package's one checkpoint error, at the bottom of ``checkpoints`` so that every reader can raise it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why (one line)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (both a checkpoint error and a ``FileNotFoundError``)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (read-only folder, full disk, name too long, a file in the way);
    the message says which and why, and that nothing was left behind (both a checkpoint error and an OSError)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with every run of whitespace (newlines included) made one space, cut to ``limit`` characters.

    Library errors (torch's unpickler, safetensors, timm) span lines and suggest unsafe retries; the part
    quoted in a ``CheckpointError`` is always a single line.
    """
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


__all__ = ["CheckpointError", "CheckpointNotFound", "CheckpointWriteError", "one_line"]
