"""The ``micronet.ShiftMax`` OpenVINO extension: Dynamic Shift-Max as one operation in an OpenVINO IR.

``micronet export --format openvino --fused-ops`` writes the ONNX deploy graph with ``micronet.ShiftMax``
nodes (as for ONNX Runtime) and converts it with this extension, which maps those nodes onto its operation;
every ``openvino.Core`` that reads the IR needs ``core.add_extension(library)``. The library is compiled on
first use from ``csrc/ov_shift_max.cpp`` with the system C++ compiler against the headers and ``libopenvino``
of the installed ``openvino`` wheel, and cached like the other native libraries. OpenVINO resolves the path it
is given back to a file name, so this process hands it ``extension_path()``: a private copy of the checked
library, never the cache's name.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path

from .build import CSRC, FusedOpsUnavailable, Library, open_ops_library

SOURCE = CSRC / "ov_shift_max.cpp"
EXTRA = "pip install micronet-torch[openvino]"
OP_TYPE, OP_VERSION = "ShiftMax", "micronet"  # the operation's type and opset in the IR's XML


def _openvino_dir() -> Path:
    spec = importlib.util.find_spec("openvino")
    if spec is None or spec.origin is None:
        raise FusedOpsUnavailable("--fused-ops with --format openvino needs openvino: " + EXTRA)
    return Path(spec.origin).parent


def _flags(ov_dir: Path) -> tuple[str, ...]:
    """Compile against the wheel's headers; link its libopenvino and ONNX frontend (named with their version)."""
    include, libs = ov_dir / "include", ov_dir / "libs"
    needed = []
    for stem in ("libopenvino.so", "libopenvino_onnx_frontend.so"):
        found = sorted(libs.glob(stem + ".*"))
        if not include.is_dir() or not found:
            raise FusedOpsUnavailable(
                f"the openvino package in {ov_dir} has no C++ headers or {stem}: the OpenVINO extension cannot be "
                "built against it (pip install a full openvino wheel, or export without --fused-ops)"
            )
        needed.append(str(found[0]))
    return ("-std=c++17", f"-I{include}", "-Wl,--no-as-needed", *needed, f"-Wl,-rpath,{libs}")


def _open(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Library:
    return open_ops_library(
        SOURCE,
        "micronet_ov_ops",
        _flags(_openvino_dir()),
        directory,
        "ov_ops",
        compiler,
        "the OpenVINO micronet.ShiftMax extension",
        cxx=True,
    )


def uses_extension(xml: str | os.PathLike) -> bool:
    """Whether an IR's XML has a ``micronet`` operation (read as text: an IR's XML holds no weights)."""
    marker = f'version="{OP_VERSION}"'.encode()
    with open(Path(xml).with_suffix(".xml"), "rb") as fh:
        return any(marker in line for line in fh)


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The cache path of the compiled extension (built first if this source / OpenVINO / CPU has none): what to
    name in messages and hand to other processes; this process loads ``extension_path()``."""
    lib = _open(directory, compiler)
    lib.close()
    return lib.path


@cache
def _held() -> Library:
    return _open()


def extension_path() -> str:
    """The extension for ``openvino.Core.add_extension`` / ``convert_model(extension=...)`` in this process: a
    private 0700 copy of the checked library (OpenVINO canonicalizes ``/proc/self/fd/N`` back to the cache's name)."""
    return str(_held().private_copy())
