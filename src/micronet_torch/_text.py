"""Text for the terminal: messages made one line, and text read from files made safe to print.

Library errors (a compiler's output, torch's unpickler, safetensors, timm) span lines; ``one_line`` makes each
the single line an error message promises. Text that comes from files someone else made (class names in a
checkpoint's or an ONNX file's metadata, image file names, the ``error`` of a ``summary.json``) may carry
terminal escape sequences (OSC, CSI: change the title, rewrite the screen, fake a line) or be megabytes long;
``printable`` shows every such character escaped, as Python writes it in a string literal, and cuts the rest.
"""

from __future__ import annotations

# how much of a text read from a file is shown by default (a class name), of a path (PATH_MAX), of a message
PRINT_LIMIT = 200
PATH_LIMIT = 4096
MESSAGE_LIMIT = 2000


def _escaped(text: str) -> str:
    """``text`` with each character that is not printable (controls, ESC, line and paragraph separators,
    bidirectional overrides, non-ASCII spaces) written as its escape: ``\\x1b``, ``\\n``, ``\\u202e``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def printable(text: object, limit: int = PRINT_LIMIT) -> str:
    """``str(text)`` safe to print on a terminal: cut to ``limit`` characters (saying how many more there were),
    then every character that is not printable escaped, so a line break or an escape sequence shows as text."""
    return _escaped(_cut(str(text), limit))


def one_line(text: object, limit: int = 600) -> str:
    """``text`` with every run of whitespace (line breaks included) made one space, cut to ``limit`` characters
    (ending in ``...``), and any other character that is not printable escaped (see ``printable``)."""
    flat = " ".join(str(text).split())
    return _escaped(flat if len(flat) <= limit else flat[: limit - 3] + "...")


__all__ = ["MESSAGE_LIMIT", "PATH_LIMIT", "PRINT_LIMIT", "one_line", "printable"]
