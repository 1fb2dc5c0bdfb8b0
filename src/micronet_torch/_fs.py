"""Files written so that nothing finished is ever lost, and no planted link is ever followed.

A crash or interrupt at any moment leaves either the old file or the complete new one, never a
half-written file. Every file the package writes for the user (checkpoints, metrics, summaries,
caches, downloads) goes through ``atomic_write``; probes and other new files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (``create_exclusive``), so a symlink planted under the name is
refused, never written through; downloads are checked against their SHA-256 before they are kept.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

_EXCLUSIVE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_HEX64 = re.compile(r"[0-9a-f]{64}")


class DownloadError(OSError):
    """A download that failed or did not match its SHA-256; nothing was kept, the message says what to do."""


# errors of the file system itself (full disk, file size limit, permissions), which deserve the file's name
_WRITE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EFBIG", "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO", "ENAMETOOLONG", "ENOENT", "ENOTDIR")
    if hasattr(errno, name)
)


def _reraise_named(err: OSError, what: str) -> NoReturn:
    """Raise ``err`` again, as the same subclass with a message naming the file when the file system failed."""
    if err.errno not in _WRITE_ERRNOS:
        raise err
    raise OSError(err.errno, f"{what} ({err.strerror or err})") from err  # OSError(errno, ...) picks the subclass


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore it at once (a thread creating files meanwhile is rare)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], mode: int | None = None) -> Path:
    """Write a file atomically: ``write(fh)`` into a temporary file in the same folder, fsync, rename.

    The file gets ``mode``, by default what ``open()`` would give a new file (0666 less the umask): the
    temporary file ``mkstemp`` makes is 0600, which would leave every result readable by its owner only.
    The temporary file is removed on failure; a file-system error (full disk, file size limit, no
    permission) is raised as the same ``OSError`` subclass with a message naming the file.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        _reraise_named(err, f"cannot create files in {path.parent}")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask() if mode is None else mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        _reraise_named(err, f"cannot write {path}")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def create_exclusive(path: str | os.PathLike, mode: int = 0o600) -> BinaryIO:
    """Open a new file for writing that did not exist before: an existing file or symlink raises FileExistsError."""
    return os.fdopen(os.open(path, _EXCLUSIVE_FLAGS, mode), "wb")


def probe_writable(folder: str | os.PathLike) -> None:
    """Check that files can be created in ``folder`` by creating (exclusively) and removing a probe file.

    The probe's name is random and created with ``O_EXCL | O_NOFOLLOW``, so a link planted in the folder is
    never written through. Raises ``OSError`` whose message names the folder.
    """
    folder = Path(folder)
    for _ in range(8):
        probe = folder / f".write-test-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            create_exclusive(probe).close()
        except FileExistsError:
            continue  # someone holds that name; never touch it
        except OSError as err:
            raise type(err)(err.errno, f"cannot create files in {folder} ({err.strerror})") from err
        probe.unlink(missing_ok=True)
        return
    raise FileExistsError(f"cannot create a probe file in {folder}: every name tried already exists")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's content, as lower-case hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_verified(
    url: str,
    dest: str | os.PathLike,
    sha256: str,
    timeout: float = 60.0,
    max_bytes: int | None = None,
) -> Path:
    """Download ``url`` (http(s) or file://) to ``dest``, kept only if its SHA-256 is ``sha256``.

    The file is written to a temporary file in ``dest``'s folder and hashed while it arrives; it is renamed
    to ``dest`` only after the check, so a truncated or substituted download never enters the cache. Any
    failure deletes the temporary file and raises ``DownloadError`` saying what happened and what to do.
    """
    expected = str(sha256).strip().lower()
    if not _HEX64.fullmatch(expected):
        raise ValueError(f"{sha256!r} is not a SHA-256 (64 hex digits)")
    if not url.startswith(("https://", "http://", "file://")):
        raise DownloadError(f"refusing to download {url!r}: only http(s):// and file:// URLs are supported")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")  # O_EXCL, 0600
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            os.fchmod(out.fileno(), 0o666 & ~current_umask())  # a cache file like any other, not mkstemp's 0600
            while block := resp.read(1 << 20):
                size += len(block)
                if max_bytes is not None and size > max_bytes:
                    raise DownloadError(f"{url} is larger than {max_bytes} bytes, more than the file can be")
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != expected:
            raise DownloadError(
                f"{url}: the downloaded file ({size} bytes) has SHA-256 {got}, expected {expected}; it was "
                f"deleted. The download was truncated or the file was replaced: retry, or download it yourself, "
                f"check its SHA-256 and put it at {dest}"
            )
        os.replace(tmp, dest)
    except DownloadError:
        Path(tmp).unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as err:  # URLError, HTTPError, timeouts are OSErrors; a bad URL a ValueError
        Path(tmp).unlink(missing_ok=True)
        raise DownloadError(f"could not download {url} ({err}); nothing was kept at {dest}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def verify_or_delete(path: str | os.PathLike, sha256: str, what: str = "file") -> Path:
    """``path`` if its SHA-256 is ``sha256``; else delete it and raise ``DownloadError`` saying so.

    For a file already in a cache (a finished download, or one the user put there): a truncated or
    substituted file does not stay there to fail the same way forever.
    """
    path = Path(path)
    expected = str(sha256).strip().lower()
    if not _HEX64.fullmatch(expected):
        raise ValueError(f"{sha256!r} is not a SHA-256 (64 hex digits)")
    got = sha256_file(path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path}: this {what} has SHA-256 {got}, expected {expected} (truncated or replaced); it was deleted "
            "and will be downloaded again next time"
        )
    return path
