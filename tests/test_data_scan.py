"""Hostile data folders: symlink loops, FIFOs, decompression bombs; the folder walk keeps os.walk's order."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
from helpers import SHARED_FIXTURES, deadline
from PIL import Image

from micronet_torch.data.scan import ImageFileError, SkipCounts, open_image_safely, walk_images

FIXTURES = SHARED_FIXTURES
M0_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams"
M2_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M2_random.pdparams"
M0_OFFICIAL = FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
SRC = Path(__file__).resolve().parents[1] / "src"


# ---- data folders -------------------------------------------------------------------------------------
def png(path: Path, size: int = 4) -> None:
    Image.new("L", (size, size)).save(path)


def test_walk_images_skips_symlink_loops(tmp_path) -> None:
    cls = tmp_path / "cat"
    (cls / "sub").mkdir(parents=True)
    for i in range(3):
        png(cls / f"{i}.png")
    png(cls / "sub" / "s.png")
    (cls / "sub" / "loop").symlink_to(cls)  # a cycle back to the class folder
    (cls / "again").symlink_to(cls / "sub")  # the same folder twice
    (cls / "broken.png").symlink_to(tmp_path / "nothing.png")
    (cls / "notes.txt").write_text("x")
    with deadline(10):
        found, skipped = walk_images(cls, (".png",))
    assert [Path(p).relative_to(cls).as_posix() for p in found] == ["0.png", "1.png", "2.png", "again/s.png"]
    assert (skipped.loops, skipped.broken_links, skipped.non_regular) == (2, 1, 0)
    assert "2 symlink loops" in skipped.summary() and "1 broken link" in skipped.summary()
    assert SkipCounts().summary() == ""


def test_walk_images_keeps_the_order_of_os_walk(tmp_path) -> None:
    """Without links, the same files in the same order as the scan it replaces (sample indices stay put)."""
    for rel in ("b/2.png", "b/1.JPG", "a/z/9.png", "a/3.png", "a/y/x/0.png", "c.png", "a/skip.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        png(tmp_path / rel) if rel.endswith("png") else (tmp_path / rel).write_bytes(b"x")
    exts = (".png", ".jpg")
    want = []
    for dirpath, dirnames, filenames in os.walk(tmp_path, followlinks=True):
        dirnames.sort()
        want.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(exts))
    found, skipped = walk_images(tmp_path, exts)
    assert found == want and skipped.total() == 0


def test_walk_images_never_opens_a_fifo(tmp_path) -> None:
    cls = tmp_path / "cat"
    cls.mkdir()
    png(cls / "a.png")
    os.mkfifo(cls / "x.png")
    (cls / "y.png").symlink_to(cls / "x.png")
    with deadline(1):
        found, skipped = walk_images(cls, ("png",))
        with pytest.raises(ImageFileError, match="not a regular file"):
            open_image_safely(cls / "x.png")
    assert found == [str(cls / "a.png")] and skipped.non_regular == 2


def bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side pixels, all zero, compressed to a few tens of KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_naming_the_file(tmp_path) -> None:
    path = tmp_path / "bomb.png"
    bomb_png(path)
    assert path.stat().st_size < 100_000
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageFileError, match=r"bomb\.png.*--max-image-pixels"):
        open_image_safely(path)
    with pytest.raises(ImageFileError, match=r"400000000 pixels.*limit of 1000 pixels"):
        open_image_safely(path, max_pixels=1000)
    with pytest.raises(ImageFileError, match="20000x20000 image"):
        open_image_safely(path, max_pixels=300_000_000)
    with open_image_safely(path, max_pixels=500_000_000) as img:  # allowed: PIL's own limit lifted for it
        assert img.size == (20000, 20000)
    with open_image_safely(path, max_pixels=0) as img:
        assert img.size == (20000, 20000)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert issubclass(ImageFileError, ValueError)  # data.open_image turns ValueError into DataError (skippable)
    small = tmp_path / "small.png"
    png(small, 8)
    with open_image_safely(small) as img:
        img.load()
        assert img.size == (8, 8)
