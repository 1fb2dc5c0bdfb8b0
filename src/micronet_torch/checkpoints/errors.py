"""The package's one checkpoint error, at the bottom of ``checkpoints`` so that every reader can raise it."""

from __future__ import annotations

from .._text import one_line  # the quoted part of a CheckpointError is always one line (re-exported)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why (one line)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (both a checkpoint error and a ``FileNotFoundError``)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (read-only folder, full disk, name too long, a file in the way);
    the message says which and why, and that nothing was left behind (both a checkpoint error and an OSError)."""


__all__ = ["CheckpointError", "CheckpointNotFound", "CheckpointWriteError", "one_line"]
