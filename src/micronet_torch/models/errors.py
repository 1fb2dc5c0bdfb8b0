"""The package's one checkpoint error, at the bottom of the models layer so that every reader can raise it."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


__all__ = ["CheckpointError"]
