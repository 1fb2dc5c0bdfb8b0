"""Single-file C/C++ libraries compiled on first use with the system compiler, into the trusted cache.

The Dynamic Shift-Max kernels (``csrc/``: the training kernel, the ONNX Runtime operator, the OpenVINO
extension, the ExecuTorch kernel) are single source files, with at most headers of their own folder
(``#include "name.h"``): built here with ``cc`` (``c++``) into ``$MICRONET_TORCH_HOME/<folder>``, keyed by
source, those headers, flags and CPU (``-march=native`` code may not run on another CPU), and retried without
the flags a compiler rejects. The compiler writes into a private temporary folder; the result is copied into
the cache through its open folder (``cache.write_library``) under the folder's lock, so concurrent first uses
build once and a reader never sees half a file. ``open_library`` returns the checked library held open
(``cache.Library``): consumers load it through ``Library.load_path()``, never by its name in the cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .._env import cache_root, cpu_name
from .._text import one_line  # a compiler's output spans many lines; the first say the most (re-exported)
from .cache import (
    MIN_LIBRARY_BYTES,
    RECORD_SUFFIX,
    BuildError,
    CacheError,
    CacheWarning,
    Library,
    checked_library,
    locked,
    open_folder,
    write_library,
)

CSRC = Path(__file__).parent / "csrc"  # every C/C++ source of the package
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden")
NATIVE_FLAGS = ("-march=native",)  # tried first; some compilers / targets reject it

# the names of the flat layout (``micronet_torch._native``)
NativeBuildError, NativeCacheError, NativeCacheWarning = BuildError, CacheError, CacheWarning

__all__ = [
    "BASE_FLAGS",
    "CSRC",
    "MIN_LIBRARY_BYTES",
    "NATIVE_FLAGS",
    "RECORD_SUFFIX",
    "BuildError",
    "CacheError",
    "CacheWarning",
    "FusedOpsUnavailable",
    "Library",
    "NativeBuildError",
    "NativeCacheError",
    "NativeCacheWarning",
    "build_library",
    "find_compiler",
    "local_includes",
    "one_line",
    "open_library",
    "open_ops_library",
]


class FusedOpsUnavailable(RuntimeError):
    """A runtime-operator library (``--fused-ops``) cannot be built or trusted here (no compiler, a failed
    build, or a cache folder that is a symlink, another user's or writable by others); the message is one line
    saying which."""


def local_includes(source: Path) -> list[Path]:
    """The files ``source`` includes from its own folder (``#include "name.h"``): part of the build's key."""
    names = re.findall(rb'^\s*#\s*include\s+"([^"/]+)"', source.read_bytes(), flags=re.MULTILINE)
    return [source.parent / n for n in dict.fromkeys(n.decode() for n in names) if n != source.name]


def find_compiler(compiler: str | None = None, cxx: bool = False) -> str | None:
    """``compiler``, else ``$CC``, else the first of cc, gcc, clang on the PATH (``cxx``: ``$CXX``, c++, g++,
    clang++)."""
    env, names = ("CXX", ("c++", "g++", "clang++")) if cxx else ("CC", ("cc", "gcc", "clang"))
    return compiler or os.environ.get(env) or next(filter(None, map(shutil.which, names)), None)


def library_name(source: Path, name: str, flags: Sequence[str]) -> str:
    """``lib<name>-<key>.so``: the key covers the source, its local headers, the flags and the CPU."""
    code = source.read_bytes() + b"".join(h.read_bytes() for h in local_includes(source))
    tag = f"{platform.machine()}-{cpu_name()}"
    key = hashlib.sha256(code + " ".join((*BASE_FLAGS, *flags, *NATIVE_FLAGS)).encode() + tag.encode()).hexdigest()
    return f"lib{name}-{key[:16]}.so"


def _compile(source: Path, flags: Sequence[str], compiler: str | None, what: str) -> bytes:
    """The library's bytes, compiled in a private temporary folder (``-march=native`` first, then without)."""
    cc = find_compiler(compiler)
    if not cc:
        raise BuildError(
            f"{what} is compiled on first use, but no C compiler was found; install one "
            "(e.g. apt-get install gcc) or set CC"
        )
    with tempfile.TemporaryDirectory(prefix="micronet-build-") as tmp:
        out = Path(tmp) / "lib.so"
        for extra in (NATIVE_FLAGS, ()):
            cmd = [cc, *BASE_FLAGS, *flags, *extra, "-o", str(out), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            raise BuildError(f"compiling {source.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        return out.read_bytes()


def open_library(
    source: Path,
    name: str,
    folder: str,
    flags: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    compiler: str | None = None,
    what: str = "this operator",
) -> Library:
    """The library ``lib<name>-<key>.so`` built from ``source``, checked and held open (``cache.Library``),
    compiling it first if the cache has none or an untrusted one.

    ``flags`` come after ``BASE_FLAGS``; ``-march=native`` is tried first, then dropped if the compiler
    refuses it. ``directory`` defaults to ``cache_root() / folder``; it and every folder above it must pass
    ``cache.open_folder``'s checks. Checking and building happen under the folder's lock.
    """
    out_dir = Path(directory) if directory is not None else cache_root() / folder
    filename = library_name(source, name, flags)
    folder_fd = open_folder(out_dir)
    try:
        with locked(folder_fd):
            lib = checked_library(folder_fd, out_dir, filename)
            if lib is None:
                write_library(folder_fd, filename, _compile(source, flags, compiler, what))
                lib = checked_library(folder_fd, out_dir, filename)
            if lib is None:
                raise CacheError(f"{out_dir / filename} changed while it was written; nothing is loaded")
            return lib
    finally:
        os.close(folder_fd)


def build_library(
    source: Path,
    name: str,
    folder: str,
    flags: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    compiler: str | None = None,
    what: str = "this operator",
) -> Path:
    """The cache path of the library ``open_library`` checks (building it if needed), for messages and for
    other processes; code that loads it in this process uses ``open_library(...).load_path()`` instead."""
    lib = open_library(source, name, folder, flags, directory, compiler, what)
    lib.close()
    return lib.path


def open_ops_library(
    source: Path,
    name: str,
    flags: tuple[str, ...],
    directory: str | os.PathLike | None,
    folder: str,
    compiler: str | None,
    what: str,
    cxx: bool = False,
) -> Library:
    """``open_library`` for a runtime-operator library (``what`` names it in messages): any build or cache
    failure, and with ``cxx`` a missing C++ compiler, is one ``FusedOpsUnavailable`` line."""
    if cxx:  # open_library looks for a C compiler by itself; a C++ one is found here
        compiler = find_compiler(compiler, cxx=True)
        if compiler is None:
            raise FusedOpsUnavailable(
                f"{what} is compiled on first use, but no C++ compiler was found; install one (e.g. apt-get install "
                "g++) or set CXX, or export without --fused-ops"
            )
    how = f"{what} (export without --fused-ops to do without it)"
    try:
        return open_library(source, name, folder, flags, directory=directory, compiler=compiler, what=how)
    except BuildError as err:  # CacheError too: an untrusted cache folder loads nothing
        raise FusedOpsUnavailable(one_line(str(err))) from err
    except OSError as err:  # the cache folder cannot be created or written
        raise FusedOpsUnavailable(one_line(f"cannot build {what}: {err}")) from err
