"""The ``micronet::shift_max`` ExecuTorch kernel: Dynamic Shift-Max as one operator in a ``.pte`` program.

``micronet export --format executorch --fused-ops`` writes the portable graph with each Dynamic Shift-Max's
fusion and max as one ``micronet::shift_max`` call between XNNPACK partitions (its hyper-function and every
convolution stay in the delegate). The runtime finds the kernel once this library is loaded into the process
(``load_kernels()``, or ``ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)`` without micronet-torch): it registers
itself in ExecuTorch's kernel registry. It is compiled on first use from ``csrc/et_shift_max.cpp``
with the system C++ compiler against the headers and ``libexecutorch`` of the installed executorch wheel, and
cached like the other native libraries. XNNPACK has no such operator and ExecuTorch no fused elementwise
kernels, which is why this one exists.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

from .build import CSRC, FusedOpsUnavailable, Library, open_ops_library
from .op import shift_max

SOURCE = CSRC / "et_shift_max.cpp"
EXTRA = "pip install micronet-torch[executorch]"
KERNEL = "micronet::shift_max"  # the operator name a program that needs the kernel holds (overload "out" apart)
_LOADED: dict[str, tuple[Library, ctypes.CDLL]] = {}  # held open: /proc/self/fd/N names one file
_OUT_VARIANT: list[torch.library.Library] = []


def _executorch_dir() -> Path:
    spec = importlib.util.find_spec("executorch")  # a namespace package: no __init__, only its folder
    if spec is None or not spec.submodule_search_locations:
        raise FusedOpsUnavailable("--fused-ops with --format executorch needs executorch: " + EXTRA)
    return Path(next(iter(spec.submodule_search_locations)))


def _flags(et_dir: Path) -> tuple[str, ...]:
    """Compile against the wheel's headers (its own c10 copy too) and link its ``libexecutorch``, whose
    registry the Python runtime uses; the version is in the flags, so a new executorch gets a new build."""
    include, lib = et_dir / "include", et_dir / "lib" / "libexecutorch.so"
    c10 = include / "executorch" / "runtime" / "core" / "portable_type" / "c10"
    if not (include / "executorch" / "runtime" / "kernel" / "kernel_includes.h").is_file() or not lib.is_file():
        raise FusedOpsUnavailable(
            f"the executorch package in {et_dir} has no C++ headers or lib/libexecutorch.so: the ExecuTorch kernel "
            "cannot be built against it (pip install the executorch wheel, or export without --fused-ops)"
        )
    version = importlib.metadata.version("executorch")
    return (
        "-std=c++17",
        f"-I{include}",
        f"-I{c10}",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
        f'-DMICRONET_EXECUTORCH_VERSION="{version}"',
        "-Wl,--no-as-needed",
        str(lib),
        f"-Wl,-rpath,{lib.parent}",
    )


def _open(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Library:
    return open_ops_library(
        SOURCE,
        "micronet_et_ops",
        _flags(_executorch_dir()),
        directory,
        "et_ops",
        compiler,
        "the ExecuTorch micronet::shift_max kernel",
        cxx=True,
    )


def library_path(directory: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """The cache path of the compiled kernel library (built first if this source / executorch / CPU has none):
    what to name in messages and hand to other processes; this process loads it with ``load_kernels``."""
    lib = _open(directory, compiler)
    lib.close()
    return lib.path


def load_kernels() -> Path:
    """Load the checked kernel library into this process (once), which registers ``micronet::shift_max.out``;
    returns its cache path. The loader opens ``/proc/self/fd/N`` of the checked file, never the cache's name."""
    if not _LOADED:
        lib = _open()
        try:
            _LOADED[str(lib.path)] = lib, ctypes.CDLL(lib.load_path(), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:  # e.g. built against another executorch than the one now installed
            lib.close()
            raise FusedOpsUnavailable(f"cannot load the ExecuTorch kernel {lib.path}: {err}") from err
    return Path(next(iter(_LOADED)))


def register_out_variant() -> None:
    """Give ``micronet::shift_max`` the out variant ``to_executorch`` turns every call into (once)."""
    if _OUT_VARIANT:
        return
    lib = torch.library.Library("micronet", "FRAGMENT")
    lib.define(
        "shift_max.out(Tensor x, Tensor coef, SymInt[] index, SymInt k, SymInt j, *, Tensor(a!) out) -> Tensor(a!)"
    )

    def out_variant(x, coef, index, k, j, out):
        return out.copy_(shift_max(x, coef, index, k, j))

    lib.impl("shift_max.out", out_variant, "CompositeExplicitAutograd")
    lib.impl("shift_max.out", lambda x, coef, index, k, j, out: out, "Meta")
    _OUT_VARIANT.append(lib)


def uses_kernels(pte: str | os.PathLike) -> bool:
    """Whether a ``.pte`` program calls ``micronet::shift_max`` (its operator names are plain strings)."""
    return KERNEL.encode() in Path(pte).read_bytes()
