"""The logs native converters and runtimes write below Python (pnnx's pass log, ExecuTorch's CPU probing).

They write to the process's stdout / stderr file descriptors, which ``contextlib.redirect_stdout`` does not
reach: ``captured()`` points both descriptors at a temporary file for its duration and keeps the text, so an
export prints only its own lines, and a converter that fails can be quoted in the one-line error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass


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
        stream.flush()
    with tempfile.TemporaryFile() as sink:
        saved = (os.dup(1), os.dup(2))
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            log.text = sink.read().decode("utf-8", "replace")
