"""Small C libraries compiled on first use with the system C compiler, and cached.

The fused Dynamic Shift-Max kernels (the ONNX Runtime operator, the training kernel) are single C files
with no headers of other projects: built here with ``cc`` into ``$MICRONET_TORCH_HOME/<folder>``, keyed by
source, flags and CPU (``-march=native`` code may not run on another CPU), atomically (concurrent first
uses are safe), and retried without the flags a compiler rejects.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ._env import cache_root, cpu_name

BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden")
NATIVE_FLAGS = ("-march=native",)  # tried first; some compilers / targets reject it


class NativeBuildError(RuntimeError):
    """A C library cannot be built here (no C compiler, or it failed); the message says what to do."""


def find_compiler(compiler: str | None = None) -> str | None:
    """``compiler``, else ``$CC``, else the first of cc, gcc, clang on the PATH."""
    return compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_library(
    source: Path,
    name: str,
    folder: str,
    flags: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    compiler: str | None = None,
    what: str = "this operator",
) -> Path:
    """The path of ``lib<name>-<key>.so`` built from ``source``, compiling it first if missing.

    ``flags`` come after ``BASE_FLAGS``; ``-march=native`` is tried first, then dropped if the compiler
    refuses it. ``directory`` defaults to ``cache_root() / folder``.
    """
    code = source.read_bytes()
    all_flags = (*BASE_FLAGS, *flags)
    tag = f"{platform.machine()}-{cpu_name()}"
    key = hashlib.sha256(code + " ".join(all_flags + NATIVE_FLAGS).encode() + tag.encode()).hexdigest()[:16]
    out_dir = Path(directory) if directory is not None else cache_root() / folder
    out = out_dir / f"lib{name}-{key}.so"
    if out.exists():
        return out
    cc = find_compiler(compiler)
    if not cc:
        raise NativeBuildError(
            f"{what} is compiled on first use, but no C compiler was found; install one "
            "(e.g. apt-get install gcc) or set CC"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        for extra in (NATIVE_FLAGS, ()):
            cmd = [cc, *all_flags, *extra, "-o", str(tmp_path), str(source)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            raise NativeBuildError(f"compiling {source.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out
