"""The ``micronet.ShiftMax`` operator for ONNX Runtime: the small C operator library and its registration.

With standard ONNX operators a Dynamic Shift-Max is a gather, a batched product or four broadcast products,
and a max: several passes over its feature map. ``micronet.ShiftMax`` reads the map once and writes the
result once. The exported graph then needs this library in every ONNX Runtime session that runs it
(``register(session_options)``), so it is opt-in (``micronet export --fused-ops``); the default export keeps
to standard operators. The library is compiled from ``csrc/ort_shift_max.c`` with the system C compiler
on first use and cached; it talks to ONNX Runtime only through the ``OrtApi`` table ONNX Runtime hands it,
so it links against nothing and works with any ONNX Runtime from 1.17 on.

``micronet_torch.fused_ops`` and ``micronet_torch.deploy.fused`` are this module's names of the 0.1 layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._env import cache_root
from .build import CSRC, FusedOpsUnavailable, Library, open_ops_library
from .op import DOMAIN

SOURCE = CSRC / "ort_shift_max.c"
CFLAGS = ("-std=c11",)
FOLDER = "ort_ops"
_HELD: dict[tuple[str, str | None], Library] = {}  # loaded libraries stay open: /proc/self/fd/N names one file

__all__ = [
    "DOMAIN",
    "FusedOpsUnavailable",
    "cache_dir",
    "library",
    "library_path",
    "onnx_translation_table",
    "register",
    "uses_fused_ops",
]


def cache_dir() -> Path:
    """Where built libraries go: ``$MICRONET_TORCH_HOME/ort_ops`` (default ``~/.cache/micronet_torch/ort_ops``)."""
    return cache_root() / FOLDER


def _open(directory: str | os.PathLike | None, compiler: str | None) -> Library:
    return open_ops_library(
        SOURCE,
        "micronet_ort_ops",
        CFLAGS,
        cache_dir() if directory is None else directory,
        FOLDER,
        compiler,
        "the fused ONNX Runtime operator library",
    )


def library(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Library:
    """The checked operator library, held open for this process (built first if this source / CPU has none)."""
    key = (str(cache_dir() if directory is None else directory), compiler)
    if key not in _HELD:
        _HELD[key] = _open(directory, compiler)
    return _HELD[key]


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The cache path of the operator library (built first if needed): what to name in messages and hand
    to other processes. This process registers it through ``register``, which loads the checked file."""
    lib = _open(directory, compiler)
    lib.close()
    return lib.path


def register(session_options: Any) -> Path:
    """Make ``micronet.*`` operators available to sessions created with ``session_options``; returns the
    library's cache path. ONNX Runtime opens ``/proc/self/fd/N`` of the checked file, never the cache's name."""
    lib = library()
    session_options.register_custom_ops_library(lib.load_path())
    return lib.path


def uses_fused_ops(model: str | os.PathLike | Any) -> bool:
    """Whether an ONNX file (or ``onnx.ModelProto``) imports the ``micronet`` operator domain."""
    import onnx  # onnx is only needed where ONNX files are read

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(opset.domain == DOMAIN for opset in proto.opset_import)


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op becomes ``micronet.ShiftMax``."""
    from .onnx_translation import shift_max_onnx  # onnxscript takes seconds to import: only when exporting

    return {torch.ops.micronet.shift_max.default: shift_max_onnx}
