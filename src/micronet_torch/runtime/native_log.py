"""The logs native converters and runtimes write below Python (pnnx's pass log, ExecuTorch's CPU probing).

They write to the process's stdout / stderr file descriptors, which ``contextlib.redirect_stdout`` does not
reach: ``captured()`` points both descriptors at a temporary file for its duration and keeps the text, so an
export prints only its own lines, and ``converting()`` quotes a converter that fails in the one-line error.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from .result import ConversionError


@dataclass
class NativeLog:
    """What was written to the process's stdout and stderr inside ``captured()``."""

    text: str = ""

    def tail(self, lines: int = 3) -> str:
        """The last non-empty lines, joined with ' | ' for a one-line message."""
        kept = [line.strip() for line in self.text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:]) or "(no output)"


@contextlib.contextmanager
def captured() -> Iterator[NativeLog]:
    """Send file descriptors 1 and 2 to a temporary file inside the block; the text is in the yielded log."""
    log = NativeLog()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None under pythonw
            stream.flush()
    with tempfile.TemporaryFile() as sink:
        saved = (os.dup(1), os.dup(2))
        # Python-level writes go to the same file in order, also where sys.stdout is not descriptor 1 (a notebook)
        text = io.TextIOWrapper(open(os.dup(sink.fileno()), "wb", buffering=0), "utf-8", "replace", write_through=True)
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield log
        finally:
            text.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            log.text = sink.read().decode("utf-8", "replace")


@contextlib.contextmanager
def converting(converter: str) -> Iterator[NativeLog]:
    """``captured()`` around a converter call: a failure inside (a missing package apart) becomes one
    ``ConversionError`` that gives the converter's reason and the last lines of its log."""
    failure = None
    with captured() as log:
        try:
            yield log
        except ImportError:
            raise
        except Exception as err:  # the converter refused the graph: its own message, with its log below
            failure = err
    if failure is not None:
        why = f"{converter} could not convert the model ({failure}); its log ends: {log.tail()}"
        raise ConversionError(why) from failure
