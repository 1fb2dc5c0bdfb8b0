"""Small C libraries compiled on first use with the system C compiler, and cached.

The fused Dynamic Shift-Max kernels (the ONNX Runtime operator, the training kernel, the OpenVINO extension)
are single source files, with at most headers of their own folder (``#include "name.h"``): built here with
``cc`` (``c++``) into ``$MICRONET_TORCH_HOME/<folder>``, keyed by source, those headers, flags and CPU
(``-march=native`` code may not run on another CPU), atomically (concurrent first uses are safe), and retried
without the flags a compiler rejects.

A library is code that runs in the user's process, so the cache is not trusted by name: its folder must
be a real folder owned by the user and writable by no one else (created 0700), and a library is returned
only when it is a regular file owned by the user whose SHA-256 matches the record written beside it
(``<lib>.sha256``) after its build. Anything else there (a symlink, a zero-byte or short file, another
user's file, a mismatch) is removed and rebuilt, with a warning that names it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from ._env import cache_root, cpu_name
from ._fs import atomic_write, sha256_file

BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden")
NATIVE_FLAGS = ("-march=native",)  # tried first; some compilers / targets reject it


MIN_LIBRARY_BYTES = 1024  # no shared library the compiler writes is smaller; a shorter file is broken
RECORD_SUFFIX = ".sha256"


class NativeBuildError(RuntimeError):
    """A C library cannot be built here (no C compiler, or it failed); the message says what to do."""


class NativeCacheError(NativeBuildError):
    """The cache folder cannot be trusted (a symlink, another user's, or writable by others): nothing is loaded."""


class NativeCacheWarning(UserWarning):
    """Something in the library cache was not what this package had built there; it was removed and rebuilt."""


def _uid() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None


def secure_folder(folder: Path) -> Path:
    """Create ``folder`` (mode 0700) or check it: a real folder, owned by this user, writable by no one else.

    A folder of ours that others may write to (made by an older version under umask 002) is tightened to
    0700 with a warning: after that no one else can add files, and each file is still checked on its own.
    A symlink or another user's folder raises ``NativeCacheError``: a library from there is never loaded.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode):
        raise NativeCacheError(
            f"the library cache {folder} is a symlink; refusing to load code through it (remove the link, or "
            "set MICRONET_TORCH_HOME to a folder of your own)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise NativeCacheError(f"the library cache {folder} is not a folder; remove it")
    uid = _uid()
    if uid is not None and st.st_uid != uid:
        raise NativeCacheError(
            f"the library cache {folder} belongs to user id {st.st_uid}, not to you ({uid}); refusing to load code "
            "from it (set MICRONET_TORCH_HOME to a folder of your own)"
        )
    if st.st_mode & 0o022:
        os.chmod(folder, 0o700)
        warnings.warn(
            f"the library cache {folder} was writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            "it is now 0700 and every library in it is checked before use",
            NativeCacheWarning,
            stacklevel=3,
        )
    return folder


def _own_regular_file(path: Path) -> tuple[bool, str | None]:
    """(exists, problem): whether ``path`` exists, and why it cannot be trusted (None when it can)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False, None
    uid = _uid()
    if stat.S_ISLNK(st.st_mode):
        return True, "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return True, "is not a regular file"
    if uid is not None and st.st_uid != uid:
        return True, f"belongs to user id {st.st_uid}, not to you"
    if st.st_mode & 0o022:
        return True, "is writable by other users"
    return True, None


def _remove(path: Path) -> None:
    """Remove a file or link (never what a link points to); a planted folder is refused."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError as err:
        raise NativeCacheError(f"{path} is a folder where a library belongs; remove it") from err


def _trusted_library(out: Path) -> Path | None:
    """``out`` when it is this user's library whose SHA-256 matches its record; else clean up, None to rebuild."""
    record = out.with_name(out.name + RECORD_SUFFIX)
    exists, problem = _own_regular_file(out)
    if not exists:
        return None
    if problem is None and os.lstat(out).st_size < MIN_LIBRARY_BYTES:
        problem = f"is only {os.lstat(out).st_size} bytes"
    if problem is None:
        rec_exists, rec_problem = _own_regular_file(record)
        if not rec_exists:
            problem = "has no SHA-256 record (built by an older version, or planted)"
        elif rec_problem is not None:
            problem = f"has a SHA-256 record that {rec_problem}"
        else:
            with open(record, "rb") as fh:
                expected = fh.read(200).decode("ascii", "replace").strip()
            got = sha256_file(out)
            if got != expected:
                problem = f"does not match its recorded SHA-256 (it was replaced after its build: {got[:16]}...)"
    if problem is None:
        return out
    warnings.warn(f"{out} {problem}; it is never loaded: removed and rebuilt", NativeCacheWarning, stacklevel=3)
    _remove(out)
    _remove(record)
    return None


def local_includes(source: Path) -> list[Path]:
    """The files ``source`` includes from its own folder (``#include "name.h"``): part of the build's key."""
    names = re.findall(rb'^\s*#\s*include\s+"([^"/]+)"', source.read_bytes(), flags=re.MULTILINE)
    return [source.parent / n for n in dict.fromkeys(n.decode() for n in names) if n != source.name]


def find_compiler(compiler: str | None = None, cxx: bool = False) -> str | None:
    """``compiler``, else ``$CC``, else the first of cc, gcc, clang on the PATH (``cxx``: ``$CXX``, c++, g++,
    clang++)."""
    env, names = ("CXX", ("c++", "g++", "clang++")) if cxx else ("CC", ("cc", "gcc", "clang"))
    return compiler or os.environ.get(env) or next(filter(None, map(shutil.which, names)), None)


def build_library(
    source: Path,
    name: str,
    folder: str,
    flags: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    compiler: str | None = None,
    what: str = "this operator",
) -> Path:
    """The path of ``lib<name>-<key>.so`` built from ``source``, compiling it first if missing or untrusted.

    ``flags`` come after ``BASE_FLAGS``; ``-march=native`` is tried first, then dropped if the compiler
    refuses it. ``directory`` defaults to ``cache_root() / folder``. The path returned is a regular file of
    this user whose SHA-256 matches the record written after its build (see the module's docstring).
    """
    code = source.read_bytes() + b"".join(h.read_bytes() for h in local_includes(source))
    all_flags = (*BASE_FLAGS, *flags)
    tag = f"{platform.machine()}-{cpu_name()}"
    key = hashlib.sha256(code + " ".join(all_flags + NATIVE_FLAGS).encode() + tag.encode()).hexdigest()[:16]
    out_dir = Path(directory) if directory is not None else cache_root() / folder
    out = out_dir / f"lib{name}-{key}.so"
    secure_folder(out_dir)
    if _trusted_library(out) is not None:
        return out
    cc = find_compiler(compiler)
    if not cc:
        raise NativeBuildError(
            f"{what} is compiled on first use, but no C compiler was found; install one "
            "(e.g. apt-get install gcc) or set CC"
        )
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False) as tmp:  # O_EXCL, 0600
        tmp_path = Path(tmp.name)
    try:
        for extra in (NATIVE_FLAGS, ()):
            cmd = [cc, *all_flags, *extra, "-o", str(tmp_path), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            raise NativeBuildError(f"compiling {source.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp_path, 0o700)
        digest = sha256_file(tmp_path)
        # the record first: a reader then sees no library, or a library and the record of its build
        record = out.with_name(out.name + RECORD_SUFFIX)
        atomic_write(record, lambda fh: fh.write(digest.encode() + b"\n"), mode=0o600)  # writable by no one else
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out
