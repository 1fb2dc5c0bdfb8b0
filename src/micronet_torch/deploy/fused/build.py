"""Fused Dynamic Shift-Max for ONNX Runtime: the small C operator library, built on first use, and its registration.

With standard ONNX operators a Dynamic Shift-Max is a gather, a batched product or four broadcast products,
and a max: several passes over its feature map. ``micronet.ShiftMax`` reads the map once and writes the
result once. The exported graph then needs this library in every ONNX Runtime session that runs it
(``register(session_options)``), so it is opt-in (``micronet export --fused-ops``); the default export keeps
to standard operators. The library is compiled from ``csrc/ort_shift_max.c`` with the system C compiler
on first use and cached; it talks to ONNX Runtime only through the ``OrtApi`` table ONNX Runtime hands it,
so it links against nothing and works with any ONNX Runtime from 1.17 on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..._env import cache_root
from ..._native import NativeBuildError, build_library, find_compiler
from ..._text import one_line
from .op import DOMAIN

SOURCE = Path(__file__).parent / "csrc" / "ort_shift_max.c"
CFLAGS = ("-std=c11",)


class FusedOpsUnavailable(RuntimeError):
    """The fused-operator library cannot be built or trusted here (no C compiler, a failed build, or a cache
    folder that is a symlink or another user's); the message is one line saying which."""


def cache_dir() -> Path:
    """Where built libraries go: ``$MICRONET_TORCH_HOME/ort_ops`` (default ``~/.cache/micronet_torch/ort_ops``)."""
    return cache_root() / "ort_ops"


def build_fused_library(
    source: Path,
    name: str,
    flags: tuple[str, ...],
    directory: str | os.PathLike | None,
    folder: str,
    compiler: str | None,
    what: str,
    cxx: bool = False,
) -> Path:
    """``build_library`` for a fused-operator library (``what`` names it in messages): any build or cache failure,
    and with ``cxx`` a missing C++ compiler, is one ``FusedOpsUnavailable`` line."""
    if cxx:  # build_library looks for a C compiler by itself; a C++ one is found here
        compiler = find_compiler(compiler, cxx=True)
        if compiler is None:
            raise FusedOpsUnavailable(
                f"{what} is compiled on first use, but no C++ compiler was found; install one (e.g. apt-get install "
                "g++) or set CXX, or export without --fused-ops"
            )
    how = f"{what} (export without --fused-ops to do without it)"
    try:
        return build_library(source, name, folder, flags, directory=directory, compiler=compiler, what=how)
    except NativeBuildError as err:  # NativeCacheError too: an untrusted cache folder loads nothing
        raise FusedOpsUnavailable(one_line(str(err))) from err
    except OSError as err:  # the cache folder cannot be created or written
        raise FusedOpsUnavailable(one_line(f"cannot build {what}: {err}")) from err


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The path of the compiled operator library, building it first if this source / CPU has no build yet."""
    return build_fused_library(
        SOURCE, "micronet_ort_ops", CFLAGS, directory, "ort_ops", compiler, "the fused ONNX Runtime operator library"
    )


def register(session_options: Any) -> Path:
    """Make ``micronet.*`` operators available to sessions created with ``session_options``."""
    path = library_path()
    session_options.register_custom_ops_library(str(path))
    return path


def uses_fused_ops(model: str | os.PathLike | Any) -> bool:
    """Whether an ONNX file (or ``onnx.ModelProto``) imports the ``micronet`` operator domain."""
    import onnx  # onnx is only needed where ONNX files are read

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(opset.domain == DOMAIN for opset in proto.opset_import)


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op becomes ``micronet.ShiftMax``."""
    from .onnx_translation import shift_max_onnx  # onnxscript takes seconds to import: only when exporting

    return {torch.ops.micronet.shift_max.default: shift_max_onnx}
