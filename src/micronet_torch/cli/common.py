"""What every subcommand shares: the user-error type that becomes one line and exit status 2, and the number
types of its flags (argparse rejects a bad value with one line naming the flag, before any work starts)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


class CLIError(Exception):
    """A user error: printed as one clear message, exit status 2, no traceback."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors the library raises for bad input: each is printed as one line (exit 2), never as a traceback.

    A fused operator library that cannot be built or loaded (no compiler, another runtime version) is one too,
    and so is an ONNX export every exporter refused (each one's reason is in the line). Their modules are
    imported here, when an error is being handled, not when the command line starts.
    """
    from ..kernels.ort_ops import FusedOpsUnavailable
    from ..runtime.result import ConversionError

    return (
        CLIError,
        ValueError,
        FileNotFoundError,
        PermissionError,
        NotADirectoryError,
        FusedOpsUnavailable,
        ConversionError,
    )


def __getattr__(name: str) -> Any:
    if name == "USER_ERRORS":  # the tuple, built on first use (``user_errors``)
        return user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _number(kind: type, low: float, low_open: bool, what: str) -> Callable[[str], int | float]:
    """An argparse ``type``: ``kind(text)`` no lower than ``low`` (above it when ``low_open``), finite."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"got {text}; use {what}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, False, "a whole number of 1 or more")
nonnegative_int = _number(int, 0, False, "a whole number of 0 or more")
positive_float = _number(float, 0.0, True, "a number above 0")
