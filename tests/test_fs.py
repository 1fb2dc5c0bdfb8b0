"""The one way files are written and downloaded (``_fs``): atomically, never through a planted link, with the
umask applied, a file-size limit named, a download kept only when it matches."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SHARED_FIXTURES

from micronet_torch import _fs

FIXTURES = SHARED_FIXTURES
M0_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams"
M2_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M2_random.pdparams"
M0_OFFICIAL = FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
SRC = Path(__file__).resolve().parents[1] / "src"


# ---- writes and downloads -----------------------------------------------------------------------------
def test_create_exclusive_never_writes_through_a_link(tmp_path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    link = tmp_path / "probe"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        _fs.create_exclusive(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(FileExistsError):
        _fs.create_exclusive(dangling)
    assert target.read_text() == "keep" and not (tmp_path / "would-be-created").exists()
    with _fs.create_exclusive(tmp_path / "new") as fh:
        fh.write(b"x")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o600


def test_probe_writable_leaves_planted_links_alone(tmp_path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / f".write-test-{os.getpid()}").symlink_to(target)
    _fs.probe_writable(out)
    assert target.read_text() == "keep"
    assert [p.name for p in out.iterdir()] == [f".write-test-{os.getpid()}"]
    with pytest.raises(OSError, match=str(tmp_path / "missing")):
        _fs.probe_writable(tmp_path / "missing")


def test_atomic_write_past_the_file_size_limit_names_the_file(tmp_path) -> None:
    """A write that fails (here: the file size limit) raises OSError naming the file, and leaves nothing."""
    script = (
        "import resource, sys\n"
        "from micronet_torch._fs import atomic_write\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "try:\n"
        "    atomic_write(sys.argv[1], lambda fh: fh.write(bytes(100_000)))\n"
        "except OSError as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    target = tmp_path / "big.bin"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert f"cannot write {target}" in proc.stdout and "File too large" in proc.stdout, proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_download_verified_keeps_only_a_matching_file(tmp_path) -> None:
    src = tmp_path / "published.pdparams"
    src.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    dest = _fs.download_verified(src.as_uri(), cache / "w.pdparams", good)
    assert dest.read_bytes() == src.read_bytes()
    bad = "0" * 64
    with pytest.raises(_fs.DownloadError, match=f"SHA-256 {good}, expected {bad}.*deleted"):
        _fs.download_verified(src.as_uri(), cache / "other.pdparams", bad)
    assert sorted(p.name for p in cache.iterdir()) == ["w.pdparams"]  # nothing half-written left
    with pytest.raises(_fs.DownloadError, match="could not download"):
        _fs.download_verified((tmp_path / "missing").as_uri(), cache / "x", good)
    with pytest.raises(_fs.DownloadError, match="larger than"):
        _fs.download_verified(src.as_uri(), cache / "y", good, max_bytes=100)
    with pytest.raises(_fs.DownloadError, match="only http"):
        _fs.download_verified("ftp://example.invalid/x", cache / "z", good)
    with pytest.raises(ValueError, match="not a SHA-256"):
        _fs.download_verified(src.as_uri(), cache / "z", "abc")
    assert sorted(p.name for p in cache.iterdir()) == ["w.pdparams"]
    assert _fs.verify_or_delete(dest, good) == dest
    dest.write_bytes(b"truncated")
    with pytest.raises(_fs.DownloadError, match="was deleted"):
        _fs.verify_or_delete(dest, good)
    assert not dest.exists()


def test_atomic_write_applies_the_umask(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        assert _fs.current_umask() == 0o027
        path = _fs.atomic_write(tmp_path / "result.json", lambda fh: fh.write(b"{}"))
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        assert _fs.atomic_write(tmp_path / "b", lambda fh: fh.write(b"x")).stat().st_mode & 0o777 == 0o664
        assert _fs.atomic_write(tmp_path / "c", lambda fh: fh.write(b"x"), mode=0o600).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
