"""The ``micronet.ShiftMax`` OpenVINO extension: Dynamic Shift-Max as one operation in an OpenVINO IR.

``micronet export --format openvino --fused-ops`` writes the ONNX deploy graph with ``micronet.ShiftMax``
nodes (as for ONNX Runtime) and converts it with this extension, which maps those nodes onto its operation;
every ``openvino.Core`` that reads the IR needs ``core.add_extension(library)``. The library is compiled on
first use from ``deploy/fused/csrc/ov_shift_max.cpp`` with the system C++ compiler against the headers and
``libopenvino`` of the installed ``openvino`` wheel, and cached like the other native libraries.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..deploy.fused.build import FusedOpsUnavailable, build_fused_library

SOURCE = Path(__file__).resolve().parent.parent / "deploy" / "fused" / "csrc" / "ov_shift_max.cpp"
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


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The path of the compiled extension, building it first if this source / OpenVINO / CPU has no build yet."""
    return build_fused_library(
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
