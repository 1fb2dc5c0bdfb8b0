"""Folder scans and image opens that a strange data folder cannot hang, multiply or blow up.

``walk_images`` follows directory symlinks (datasets are often assembled from links) but enters each
real folder once, by its (device, inode) pair, so a symlink loop cannot multiply the samples; it takes
only regular files, and never opens a FIFO, socket or device (a FIFO named ``x.png`` would block the scan
forever). ``open_image_safely`` refuses images with more pixels than a limit (PIL's decompression-bomb
check, made to name the file and to honour ``--max-image-pixels``).
"""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from .config import DEFAULT_MAX_IMAGE_PIXELS

_PIL_LIMIT_LOCK = threading.Lock()


class ImageFileError(ValueError):
    """An image file that is refused before decoding (too many pixels, not a regular file); names the file."""


@dataclass
class SkipCounts:
    """What a scan left out, for the summary: folders reached again through a link, and special files."""

    loops: int = 0  # directory links into a folder already scanned (symlink cycles, or the same folder twice)
    non_regular: int = 0  # FIFOs, sockets and devices, never opened
    broken_links: int = 0  # symlinks to nothing
    unreadable: int = 0  # folders that could not be listed

    def total(self) -> int:
        return self.loops + self.non_regular + self.broken_links + self.unreadable

    def add(self, other: SkipCounts) -> SkipCounts:
        """Sum in place (one count for a whole dataset of class folders)."""
        self.loops += other.loops
        self.non_regular += other.non_regular
        self.broken_links += other.broken_links
        self.unreadable += other.unreadable
        return self

    def summary(self) -> str:
        """One phrase for the scan summary, e.g. "skipped 2 symlink loops, 1 special file"; empty when none."""
        parts = [
            f"{n} {what}{'' if n == 1 else 's'}"
            for n, what in (
                (self.loops, "symlink loop"),
                (self.non_regular, "special file (FIFO, socket or device)"),
                (self.broken_links, "broken link"),
                (self.unreadable, "unreadable folder"),
            )
            if n
        ]
        return f"skipped {', '.join(parts)}" if parts else ""


def _normalise(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)


def walk_images(root: str | os.PathLike, extensions: Iterable[str]) -> tuple[list[str], SkipCounts]:
    """The regular files under ``root`` (any depth) whose names end with one of ``extensions``, and what was skipped.

    Order is that of ``os.walk`` with sorted names (a folder's files, then each subfolder in turn). Directory
    symlinks are followed, but a folder already entered (same st_dev, st_ino) is not entered again. Files are
    only ``stat``-ed, never opened.
    """
    exts = _normalise(extensions)
    counts = SkipCounts()
    found: list[str] = []
    root = os.fspath(root)
    try:
        st = os.stat(root)
    except OSError:
        counts.unreadable += 1
        return found, counts
    visited = {(st.st_dev, st.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            counts.unreadable += 1
            continue
        subfolders = []
        for entry in entries:
            try:
                st = os.stat(entry.path)  # follows links; stat never opens the file
            except OSError:
                counts.broken_links += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    counts.loops += 1
                else:
                    visited.add(key)
                    subfolders.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                if entry.name.lower().endswith(exts):
                    found.append(entry.path)
            else:
                counts.non_regular += 1
        stack.extend(reversed(subfolders))
    return found, counts


def _too_large(path: str | os.PathLike, detail: str, limit: int) -> ImageFileError:
    return ImageFileError(
        f"{path}: {detail}, more than the limit of {limit} pixels; it may be a decompression bomb. If the image "
        "is genuine, raise --max-image-pixels (0 for no limit)"
    )


def open_image_safely(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """``Image.open(path)`` (lazy, not yet decoded) for a regular file of at most ``max_pixels`` pixels.

    ``max_pixels`` defaults to ``DEFAULT_MAX_IMAGE_PIXELS``; 0 or negative means no limit. A larger image, or
    a FIFO or device, raises ``ImageFileError`` (a ``ValueError``) naming the file, before any decoding.
    Use as ``with open_image_safely(p, n) as img: img.load()``.
    """
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageFileError(f"{path}: not a regular file (a FIFO, socket or device); it is never opened")
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if pil_limit is not None and (limit <= 0 or limit > pil_limit):
                with _PIL_LIMIT_LOCK:  # PIL's own check is global: lift it for this open only
                    Image.MAX_IMAGE_PIXELS = None
                    try:
                        img = Image.open(path)
                    finally:
                        Image.MAX_IMAGE_PIXELS = pil_limit
            else:
                img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise _too_large(path, str(err).split(" exceeds")[0].strip().rstrip("."), limit) from err
    width, height = img.size
    if limit > 0 and width * height > limit:
        img.close()
        raise _too_large(path, f"a {width}x{height} image has {width * height} pixels", limit)
    return img


__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageFileError", "SkipCounts", "open_image_safely", "walk_images"]
