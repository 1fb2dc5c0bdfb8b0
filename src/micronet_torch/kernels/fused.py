"""Fused Dynamic Shift-Max for training: one pass forward, one pass backward, as ``torch.library`` ops.

(``ops.shift_max`` is the public module; this is the training kernels' registration, ``ops.shift_max_fused``
of the 0.1 layout.)

The eager module makes ~10 passes over its feature map forward and more backward (the shift's gather, four
products, two sums, the max and its masks) and keeps several full-size intermediates for the backward. Here
the fusion-and-max ``y = max_k sum_j a^k_{c,j} * x[shift_j(c)]`` is one operator that keeps only x and the
coefficients; its backward recomputes which branch won and returns the gradients of x and of the
coefficients in one pass. The hyper-function that makes the coefficients stays in torch.

- CPU: ``csrc/dsm_train.c``, compiled on first use with the system C compiler (OpenMP when the compiler has
  it) and cached under ``$MICRONET_TORCH_HOME/dsm_train``, called through ctypes on raw data pointers.
  The library is loaded through ``/proc/self/fd/N`` of the checked file (``build.open_library``).
- CUDA: the Triton kernels of ``fused_triton``.

Both are ``torch.library.custom_op`` with fake implementations, so ``torch.compile`` traces through them.
Floating types other than float32 / float64 (bfloat16, float16 under autocast) are computed in float32;
the output has the dtype eager Dynamic Shift-Max gives (the promotion of x's and the coefficients' dtypes).
"""

from __future__ import annotations

import ctypes
import warnings
from functools import cache
from pathlib import Path

import torch

from .build import CSRC, Library, NativeBuildError, open_library

SOURCE = CSRC / "dsm_train.c"
FLAGS = ("-std=c11", "-ffp-contract=off")  # no fused multiply-add: the forward rounds exactly as eager does
OPENMP_FLAGS = ("-fopenmp",)
SERIAL_FLAGS = ("-fopenmp-simd",)  # a compiler without the OpenMP runtime still vectorizes the loops
MIN_PARALLEL = 1 << 15  # elements below which a call runs on one thread (thread start-up costs more)

_LAYOUT_NCHW, _LAYOUT_NHWC, _LAYOUT_NCHW_BY_PIXEL = 0, 1, 2
BY_PIXEL_MAX_HW = 8  # NCHW maps of at most this many pixels loop over channels (rows too short to vectorize)


class _Kernels:
    """The four C entry points, with ctypes signatures."""

    def __init__(self, library: Library) -> None:
        lib = ctypes.CDLL(library.load_path())
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.forward, self.backward = {}, {}
        for dtype, sfx in ((torch.float32, "f32"), (torch.float64, "f64")):
            fwd = getattr(lib, f"dsm_forward_{sfx}")
            fwd.argtypes = [ptr] * 4 + [i64] * 3 + [i32] * 4
            fwd.restype = None
            bwd = getattr(lib, f"dsm_backward_{sfx}")
            bwd.argtypes = [ptr] * 7 + [i64] * 3 + [i32] * 4
            bwd.restype = None
            self.forward[dtype], self.backward[dtype] = fwd, bwd
        self.library = library  # held open while the kernels live: the loader opened its descriptor
        self.path: Path = library.path


@cache
def _cpu_kernels() -> _Kernels | None:
    """The compiled CPU kernels, or None (with one warning) when they cannot be built here."""
    try:
        try:
            lib = open_library(SOURCE, "micronet_dsm_train", "dsm_train", (*FLAGS, *OPENMP_FLAGS), what="fused DSM")
        except NativeBuildError:
            lib = open_library(SOURCE, "micronet_dsm_train", "dsm_train", (*FLAGS, *SERIAL_FLAGS), what="fused DSM")
        return _Kernels(lib)
    except (NativeBuildError, OSError) as err:
        warnings.warn(f"fused Dynamic Shift-Max unavailable on the CPU, using the eager path: {err}", stacklevel=3)
        return None


@torch.compiler.assume_constant_result  # a compiled model asks once; tracing never builds or loads a library
def cpu_available() -> bool:
    """Whether the CPU kernels are built (building them now if needed)."""
    return _cpu_kernels() is not None


@cache
def cuda_available() -> bool:
    """Whether the Triton kernels can run (Triton importable)."""
    try:
        from . import fused_triton  # noqa: F401  (triton is a heavy optional import: only for CUDA tensors)
    except ImportError:
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether the fused operator runs on ``device``."""
    if device.type == "cpu":
        return cpu_available()
    if device.type == "cuda":
        return cuda_available()
    return False


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as a dense NCHW or NHWC tensor and the layout code the kernels take."""
    hw = x.shape[2] * x.shape[3]
    if x.is_contiguous(memory_format=torch.channels_last) and (hw == 1 or not x.is_contiguous()):
        return x, _LAYOUT_NHWC  # 1x1 maps: both layouts are the same memory
    x = x.contiguous()
    return x, _LAYOUT_NCHW_BY_PIXEL if hw <= BY_PIXEL_MAX_HW else _LAYOUT_NCHW


def _like(t: torch.Tensor, layout: int) -> torch.Tensor:
    """t in the given layout (a no-op when it already is)."""
    fmt = torch.channels_last if layout == _LAYOUT_NHWC else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _work_dtype(x: torch.Tensor, coef: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype as eager gives it, dtype the CPU kernel computes in)."""
    out = torch.promote_types(x.dtype, coef.dtype)
    return out, out if out in (torch.float32, torch.float64) else torch.float32


def _threads(numel: int) -> int:
    return 1 if numel < MIN_PARALLEL else torch.get_num_threads()


def _cpu_forward(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """The C forward kernel on x (N, C, H, W) and coef (N, K*J*C): y in x's memory layout."""
    out_dtype, work = _work_dtype(x, coef)
    xw, layout = _layout(x.to(work))
    cw = coef.to(work).contiguous()
    idx = index.to(torch.int64).contiguous()
    y = torch.empty_like(xw)
    n, c, h, w = xw.shape
    kern = _cpu_kernels()
    kern.forward[work](xw.data_ptr(), cw.data_ptr(), idx.data_ptr(), y.data_ptr(), n, c, h * w, k, j, layout,
                       _threads(xw.numel()))  # fmt: skip
    return y.to(out_dtype)


def _cpu_backward(
    x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, grad: torch.Tensor, k: int, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C backward kernel: (grad_x in x's dtype and layout, grad_coef (N, K*J*C) in coef's dtype)."""
    _, work = _work_dtype(x, coef)
    xw, layout = _layout(x.to(work))
    gw = _like(grad.to(work), layout)
    cw = coef.to(work).contiguous()
    idx, inv = index.to(torch.int64).contiguous(), inverse.to(torch.int64).contiguous()
    gx, gc = torch.empty_like(xw), torch.empty_like(cw)
    n, c, h, w = xw.shape
    kern = _cpu_kernels()
    kern.backward[work](xw.data_ptr(), cw.data_ptr(), idx.data_ptr(), inv.data_ptr(), gw.data_ptr(), gx.data_ptr(),
                        gc.data_ptr(), n, c, h * w, k, j, layout, _threads(xw.numel()))  # fmt: skip
    return gx.to(x.dtype), gc.to(coef.dtype)


@torch.library.custom_op("micronet::dsm_train_forward", mutates_args=())
def dsm_forward(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """y (N, C, H, W) = max_k sum_j coef[n, (k*J + j)*C + c] * x[n, shift_j(c)], in x's memory layout."""
    if x.device.type == "cuda":
        from .fused_triton import triton_forward  # triton: only imported for CUDA tensors

        return triton_forward(x, coef, index, k, j)
    return _cpu_forward(x, coef, index, k, j)


@dsm_forward.register_fake
def _(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, coef.dtype))


@torch.library.custom_op("micronet::dsm_train_backward", mutates_args=())
def dsm_backward(
    x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, grad: torch.Tensor, k: int, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x in x's dtype and layout, grad_coef (N, K*J*C) in coef's dtype) of ``dsm_forward``."""
    if x.device.type == "cuda":
        from .fused_triton import triton_backward  # triton: only imported for CUDA tensors

        return triton_backward(x, coef, index, inverse, grad, k, j)
    return _cpu_backward(x, coef, index, inverse, grad, k, j)


@dsm_backward.register_fake
def _(
    x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, grad: torch.Tensor, k: int, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(coef, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    x, coef, index, k, j = inputs
    ctx.save_for_backward(x, coef, index, torch.argsort(index))
    ctx.k, ctx.j = k, j


def _backward(ctx, grad: torch.Tensor):
    x, coef, index, inverse = ctx.saved_tensors
    gx, gc = dsm_backward(x, coef, index, inverse, grad, ctx.k, ctx.j)
    return gx, gc, None, None, None


dsm_forward.register_autograd(_backward, setup_context=_setup_context)


class _CpuFusedShiftMax(torch.autograd.Function):
    """The same C kernels as the ``torch.library`` ops, called without their dispatch: eager CPU training makes
    two calls per Dynamic Shift-Max per step, and the dispatch's Python costs more than the kernel itself on
    small maps."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
        ctx.save_for_backward(x, coef, index)
        ctx.k, ctx.j = k, j
        return _cpu_forward(x, coef, index, k, j)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, coef, index = ctx.saved_tensors
        gx, gc = _cpu_backward(x, coef, index, torch.argsort(index), grad, ctx.k, ctx.j)
        return gx, gc, None, None, None


def fused_shift_max(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """Dynamic Shift-Max's fusion and max of x (N, C, H, W) with coefficients (N, K*J*C) or (N, K, J, C, ...).
    Eager CPU calls take the direct autograd function; CUDA and anything ``torch.compile`` traces take the
    ``torch.library`` ops (their fake kernels are what the compiler needs)."""
    coef = coef.reshape(x.shape[0], -1)
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CpuFusedShiftMax.apply(x, coef, index, k, j)
    return dsm_forward(x, coef, index, k, j)
