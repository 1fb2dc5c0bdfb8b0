"""The cache of built libraries, trusted through file descriptors, never by name.

A library is code that runs in the user's process, and a path can be swapped between the moment it is
checked and the moment it is opened (a rename, a symlink). So nothing here goes by path twice:

- ``open_folder`` walks from ``/`` to the cache folder one ``O_NOFOLLOW | O_DIRECTORY`` open at a time
  (``dir_fd``), creating missing folders 0700, and checks each open folder with ``fstat``: owned by this user
  or root, and writable by no other user (other-writable, or group-writable with a group that has another
  member), unless the sticky bit keeps others from renaming what is not theirs (``/tmp``). Any other folder
  on the way is refused with one ``CacheError`` line naming it and saying why.
- ``checked_library`` opens a library in that folder (``O_NOFOLLOW``), checks the open handle (a regular file
  of this user or root, writable by no one else, not truncated) and hashes the open handle against the
  SHA-256 recorded beside it at build time. A library that fails is removed (with a ``CacheWarning``) so that
  it is rebuilt.
- The ``Library`` it returns holds the checked file open: ``load_path`` is ``/proc/self/fd/N``, which the
  loader resolves to that very file whatever happens to the name, or (where there is no ``/proc`` or for a
  loader that canonicalizes paths) ``private_copy`` writes the checked bytes into a fresh 0700 folder.
- ``locked`` holds an exclusive ``flock`` on the cache folder while a library is checked and built, so two
  processes (pytest-xdist workers) build it once: the second waits, then finds it built.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from functools import cache
from pathlib import Path

try:  # POSIX only: elsewhere ``open_folder`` refuses, and the kernels' users fall back to what needs no library
    import fcntl
    import grp
    import pwd
except ImportError:  # pragma: no cover - not POSIX
    fcntl = grp = pwd = None  # type: ignore[assignment]

MIN_LIBRARY_BYTES = 1024  # no shared library the compiler writes is smaller; a shorter file is broken
RECORD_SUFFIX = ".sha256"
_NOFOLLOW, _CLOEXEC = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC  # a planted FIFO never blocks
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_PROC_FD = Path("/proc/self/fd")


class BuildError(RuntimeError):
    """A C library cannot be built here (no C compiler, or it failed); the message says what to do."""


class CacheError(BuildError):
    """The cache folder cannot be trusted (a symlink, another user's, or writable by others): nothing is loaded."""


class CacheWarning(UserWarning):
    """Something in the library cache was not what this package had built there; it was removed and rebuilt."""


def _uid() -> int:
    return os.geteuid()


@cache
def _group_has_others(gid: int) -> bool:
    """Whether a user other than this one (and root) is in group ``gid``; an unknown group counts as shared."""
    uid = _uid()
    try:
        group = grp.getgrgid(gid)
        me = pwd.getpwuid(uid).pw_name
    except KeyError:
        return True
    if set(group.gr_mem) - {me, "root"}:
        return True
    return any(p.pw_gid == gid and p.pw_uid not in (uid, 0) for p in pwd.getpwall())


def folder_problem(st: os.stat_result) -> str | None:
    """Why a folder with this ``fstat`` cannot hold code this process loads (None when it can)."""
    uid = _uid()
    if st.st_uid not in (uid, 0):
        return f"belongs to user id {st.st_uid}, not to you ({uid}) or root"
    if st.st_mode & stat.S_ISVTX:  # sticky: others may add their own entries, never rename or remove ours
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"is writable by other users (mode {mode:o}, no sticky bit)"
    if mode & stat.S_IWGRP and _group_has_others(st.st_gid):
        return f"is writable by group id {st.st_gid}, which has other members (mode {mode:o}, no sticky bit)"
    return None


def _refuse(folder: str, why: str) -> CacheError:
    return CacheError(
        f"the library cache folder {folder} {why}: refusing to load code through it (fix it, e.g. chmod go-w, or "
        "set MICRONET_TORCH_HOME to a folder of your own)"
    )


def open_folder(folder: str | os.PathLike) -> int:
    """An open descriptor of ``folder``, created (0700) if missing, reached by a checked walk from ``/``.

    Symlinks above the cache folder are resolved first (``realpath``: ``/tmp`` may be one); the folder itself
    must not be one. Every folder on the resolved way is then opened without following links and checked
    with ``fstat`` (``folder_problem``); the first that fails raises ``CacheError`` naming it.
    """
    if fcntl is None or not hasattr(os, "O_DIRECTORY"):
        raise CacheError("native kernels are built and loaded on POSIX systems only (Linux, macOS)")
    folder = Path(folder).absolute()
    real = Path(os.path.realpath(folder.parent)) / folder.name
    fd = os.open("/", _DIR_FLAGS)
    walked = Path("/")
    try:
        why = folder_problem(os.fstat(fd))
        if why is not None:
            raise _refuse("/", why)
        for name in real.parts[1:]:
            walked = walked / name
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                link = stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
                raise _refuse(str(walked), "is a symlink" if link else "is not a folder") from err
            os.close(fd)
            fd = nxt
            why = folder_problem(os.fstat(fd))
            if why is not None:
                raise _refuse(str(walked), why)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def locked(folder_fd: int) -> Iterator[None]:
    """An exclusive lock on the open cache folder (``flock`` on its descriptor) for the block. Where the file
    system has no such locks (some NFS mounts) the block runs unlocked: builds are still atomic renames, and
    two first uses may then both compile."""
    try:
        fcntl.flock(folder_fd, fcntl.LOCK_EX)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        fcntl.flock(folder_fd, fcntl.LOCK_UN)


def sha256_fd(fd: int) -> str:
    """The SHA-256 of an open file's contents, read with ``pread`` (the file's offset is left alone)."""
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _open_checked(folder_fd: int, name: str) -> tuple[int | None, str | None]:
    """(descriptor, problem) of ``name`` in the folder: (None, None) when absent; the descriptor is open
    (the caller closes it) exactly when there is no problem."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=folder_fd)
    except FileNotFoundError:
        return None, None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "is a symlink"
        if err.errno == errno.EISDIR:
            return None, "is a folder"
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_uid not in (_uid(), 0):
        problem = f"belongs to user id {st.st_uid}, not to you"
    elif st.st_mode & 0o022:
        problem = "is writable by other users"
    if problem is not None:
        os.close(fd)
        return None, problem
    return fd, None


def _remove(folder_fd: int, name: str, shown: Path) -> None:
    """Remove a file or link in the folder (never what a link points to); a planted folder is refused."""
    try:
        os.unlink(name, dir_fd=folder_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError as err:
        raise CacheError(f"{shown} is a folder where a library belongs; remove it") from err


class Library:
    """A checked library, held open: load it through ``load_path()`` (or ``private_copy()``), never by ``path``."""

    def __init__(self, path: Path, fd: int, sha256: str) -> None:
        self.path = path  # its name in the cache: for messages, and for users outside this process
        self.fd = fd
        self.sha256 = sha256
        self._copy: Path | None = None
        self._closer = weakref.finalize(self, os.close, fd)

    def __repr__(self) -> str:
        return f"Library({str(self.path)!r}, fd={self.fd})"

    def load_path(self) -> str:
        """A path that opens the checked file itself: ``/proc/self/fd/N`` (else a private copy).

        From then on the descriptor stays open for the life of the process: the dynamic loader finds an
        already loaded library by its path name, so ``N`` must never name another file."""
        if not _PROC_FD.is_dir():
            return str(self.private_copy())
        self._closer.detach()
        return str(_PROC_FD / str(self.fd))

    def private_copy(self) -> Path:
        """The checked bytes copied into a fresh 0700 folder of this process (made once, removed by ``close``
        or at exit), for loaders that resolve ``/proc/self/fd/N`` back to the cache's name."""
        if self._copy is None:
            tmp = tempfile.mkdtemp(prefix="micronet-lib-")  # 0700, ours
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
            out = Path(tmp) / self.path.name
            dest = os.open(out, _NEW_FLAGS, 0o500)
            try:
                offset = 0
                while chunk := os.pread(self.fd, 1 << 20, offset):
                    os.write(dest, chunk)
                    offset += len(chunk)
            finally:
                os.close(dest)
            with open(out, "rb") as fh:
                if hashlib.file_digest(fh, "sha256").hexdigest() != self.sha256:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise CacheError(f"{self.path} changed after its check; nothing is loaded")
            self._copy = out
        return self._copy

    def close(self) -> None:
        """Remove the private copy, and close the descriptor unless ``load_path`` handed it to a loader."""
        if self._copy is not None:
            shutil.rmtree(self._copy.parent, ignore_errors=True)
            self._copy = None
        self._closer()


def checked_library(folder_fd: int, folder: Path, name: str) -> Library | None:
    """The library ``name`` of the open cache folder when it is this user's and matches its recorded SHA-256,
    as an open ``Library``; else remove it and its record (with a warning naming why) and return None."""
    path = folder / name
    fd, problem = _open_checked(folder_fd, name)
    if fd is None and problem is None:
        return None
    record_name = name + RECORD_SUFFIX
    if problem is None:
        size = os.fstat(fd).st_size
        if size < MIN_LIBRARY_BYTES:
            problem = f"is only {size} bytes"
    if problem is None:
        rec_fd, rec_problem = _open_checked(folder_fd, record_name)
        if rec_fd is None and rec_problem is None:
            problem = "has no SHA-256 record (built by an older version, or planted)"
        elif rec_problem is not None:
            problem = f"has a SHA-256 record that {rec_problem}"
        else:
            expected = os.pread(rec_fd, 200, 0).decode("ascii", "replace").strip()
            os.close(rec_fd)
            got = sha256_fd(fd)
            if got == expected:
                return Library(path, fd, got)
            problem = f"does not match its recorded SHA-256 (it was replaced after its build: {got[:16]}...)"
    if fd is not None:
        os.close(fd)
    warnings.warn(f"{path} {problem}; it is never loaded: removed and rebuilt", CacheWarning, stacklevel=3)
    _remove(folder_fd, name, path)
    _remove(folder_fd, record_name, path.with_name(record_name))
    return None


def write_library(folder_fd: int, name: str, data: bytes) -> None:
    """Put ``data`` into the folder as ``name`` with its SHA-256 record, each written to a temporary name and
    renamed into place, the record first: a reader sees no library, or a library and the record of its build."""
    digest = hashlib.sha256(data).hexdigest()
    _write_renamed(folder_fd, name + RECORD_SUFFIX, digest.encode() + b"\n", 0o600)
    _write_renamed(folder_fd, name, data, 0o700)


def _write_renamed(folder_fd: int, name: str, data: bytes, mode: int) -> None:
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, _NEW_FLAGS, mode, dir_fd=folder_fd)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond ``mode``
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder_fd)
        raise
