"""Fused Dynamic Shift-Max for ONNX Runtime: a small C operator library, and the PyTorch op that exports to it.

With standard ONNX operators a Dynamic Shift-Max is a gather, a batched product or four broadcast products,
and a max: several passes over its feature map. ``micronet.ShiftMax`` reads the map once and writes the
result once. The exported graph then needs this library in every ONNX Runtime session that runs it
(``register(session_options)``), so it is opt-in (``micronet export --fused-ops``); the default export keeps
to standard operators. The library is compiled from ``csrc/ort_shift_max.c`` with the system C compiler
on first use and cached; it talks to ONNX Runtime only through the ``OrtApi`` table ONNX Runtime hands it,
so it links against nothing and works with any ONNX Runtime from 1.17 on.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

DOMAIN = "micronet"
SOURCE = Path(__file__).parent / "csrc" / "ort_shift_max.c"
CFLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden")
NATIVE_FLAGS = ("-march=native",)  # tried first; some compilers / targets reject it


class FusedOpsUnavailable(RuntimeError):
    """The fused-operator library cannot be built here (no C compiler, or it failed)."""


def cache_dir() -> Path:
    """Where built libraries go: ``$MICRONET_TORCH_HOME/ort_ops`` (default ``~/.cache/micronet_torch/ort_ops``)."""
    return Path(os.environ.get("MICRONET_TORCH_HOME", Path.home() / ".cache" / "micronet_torch")) / "ort_ops"


def _cpu_tag() -> str:
    """The CPU model, part of the cache key: ``-march=native`` code may not run on another CPU."""
    from .bench import cpu_name

    return f"{platform.machine()}-{cpu_name()}"


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The path of the compiled operator library, building it first if this source / CPU has no build yet.

    The build is atomic (compiled to a temporary name, then renamed), so concurrent first uses are safe.
    """
    source = SOURCE.read_bytes()
    flags = " ".join(CFLAGS + NATIVE_FLAGS).encode()
    key = hashlib.sha256(source + flags + _cpu_tag().encode()).hexdigest()[:16]
    out_dir = Path(directory) if directory is not None else cache_dir()
    out = out_dir / f"libmicronet_ort_ops-{key}.so"
    if out.exists():
        return out
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise FusedOpsUnavailable(
            "the fused ONNX Runtime operators are compiled on first use, but no C compiler was found; "
            "install one (e.g. apt-get install gcc) or set CC, or export without --fused-ops"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        for extra in (NATIVE_FLAGS, ()):
            cmd = [cc, *CFLAGS, *extra, "-o", str(tmp_path), str(SOURCE)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                break
        else:
            raise FusedOpsUnavailable(f"compiling {SOURCE.name} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp_path, out)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out


def register(session_options: Any) -> Path:
    """Make ``micronet.*`` operators available to sessions created with ``session_options``."""
    path = library_path()
    session_options.register_custom_ops_library(str(path))
    return path


def uses_fused_ops(model: str | os.PathLike | Any) -> bool:
    """Whether an ONNX file (or ``onnx.ModelProto``) imports the ``micronet`` operator domain."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return any(opset.domain == DOMAIN for opset in proto.opset_import)


# ---- the PyTorch side -------------------------------------------------------------------------------------
@torch.library.custom_op("micronet::shift_max", mutates_args=())
def shift_max(x: torch.Tensor, coef: torch.Tensor, index: list[int], k: int, j: int) -> torch.Tensor:
    """Dynamic Shift-Max's fusion and max, given its coefficients: the reference of ``micronet.ShiftMax``.

    Output channel ``a`` reads input channels ``index[a*j : (a+1)*j]`` (x, then its shift) and coefficients
    ``coef[:, a*k*j : (a+1)*k*j]`` in (k, j) order: ``y_a = max_k sum_j coef[a, k, j] * x[index[a*j + j]]``.
    """
    n, c_out = x.shape[0], len(index) // j
    u = torch.index_select(x, 1, torch.tensor(index, dtype=torch.long, device=x.device))
    y = torch.matmul(coef.reshape(n, c_out, k, j), u.reshape(n, c_out, j, -1))
    y = y.amax(2) if k > 1 else y[:, :, 0]
    return y.reshape(n, c_out, x.shape[2], x.shape[3])


@shift_max.register_fake
def _shift_max_fake(x: torch.Tensor, coef: torch.Tensor, index: list[int], k: int, j: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], len(index) // j, x.shape[2], x.shape[3]))


def onnx_translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op becomes ``micronet.ShiftMax``."""
    from ._onnxscript_ops import shift_max_onnx

    return {torch.ops.micronet.shift_max.default: shift_max_onnx}
