"""The package's one checkpoint error, at the bottom of the models layer so that every reader can raise it."""

from __future__ import annotations

from .._text import one_line  # the quoted part of a CheckpointError is always one line (re-exported)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why (one line)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (both a checkpoint error and a ``FileNotFoundError``)."""


__all__ = ["CheckpointError", "CheckpointNotFound", "one_line"]
