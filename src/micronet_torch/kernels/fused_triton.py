"""Triton kernels of the fused Dynamic Shift-Max (``fused``) for CUDA tensors.

Addresses are ``n * stride_n + c * stride_c + p * stride_p`` with p the flattened pixel: a dense NCHW map has
stride_p = 1, a channels-last one stride_p = C, so one kernel serves both layouts. Loads of any floating
type are computed in float32 (float64 stays float64). The forward is one program per (sample, channel,
pixel block); the backward one program per (sample, channel) that walks the whole map, so the coefficient
gradients are summed in registers, without atomics (deterministic). As in the CPU kernel, the backward
recomputes the winning branch and gives each branch torch.maximum's share (1, or 0.5 on an exact tie), and
channel d's gradient gathers the shifted term of channel inverse[d].

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU tensors, which is how
the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FWD_BLOCK = 1024
BWD_BLOCK = 512


@triton.jit
def _win(b0, b1):
    """torch.maximum's backward share of branch b0 against b1."""
    return tl.where(b0 < b1, 0.0, tl.where(b0 == b1, 0.5, 1.0))


@triton.jit
def _dsm_fwd(x_ptr, coef_ptr, index_ptr, y_ptr, C, HW, s_n, s_c, s_p,
             K: tl.constexpr, J: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n, c = row // C, row % C
    ct = tl.float64 if F64 else tl.float32
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    a = coef_ptr + n * (K * J * C) + c
    x0 = tl.load(x_ptr + n * s_n + c * s_c + p * s_p, mask=mask, other=0.0).to(ct)
    b0 = tl.load(a).to(ct) * x0
    if J == 2:
        cs = tl.load(index_ptr + c)
        x1 = tl.load(x_ptr + n * s_n + cs * s_c + p * s_p, mask=mask, other=0.0).to(ct)
        b0 = b0 + tl.load(a + C).to(ct) * x1
    if K == 2:
        b1 = tl.load(a + J * C).to(ct) * x0
        if J == 2:
            b1 = b1 + tl.load(a + 3 * C).to(ct) * x1
        b0 = tl.where(b1 > b0, b1, b0)
    tl.store(y_ptr + n * s_n + c * s_c + p * s_p, b0.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dsm_bwd(x_ptr, coef_ptr, index_ptr, inverse_ptr, g_ptr, gx_ptr, gc_ptr, C, HW, s_n, s_c, s_p, g_n, g_c, g_p,
             K: tl.constexpr, J: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    n, c = row // C, row % C
    ct = tl.float64 if F64 else tl.float32
    a = coef_ptr + n * (K * J * C)
    cs = tl.load(index_ptr + c)
    ci = tl.load(inverse_ptr + c)
    a00 = tl.load(a + c).to(ct)
    a01 = tl.load(a + C + c).to(ct) if J == 2 else 0.0
    a10 = tl.load(a + J * C + c).to(ct) if K == 2 else 0.0
    a11 = tl.load(a + 3 * C + c).to(ct) if K * J == 4 else 0.0
    e00 = tl.load(a + ci).to(ct) if J == 2 else 0.0
    e01 = tl.load(a + C + ci).to(ct) if J == 2 else 0.0
    e10 = tl.load(a + 2 * C + ci).to(ct) if K * J == 4 else 0.0
    e11 = tl.load(a + 3 * C + ci).to(ct) if K * J == 4 else 0.0
    s00 = tl.zeros((BLOCK,), ct)
    s01 = tl.zeros((BLOCK,), ct)
    s10 = tl.zeros((BLOCK,), ct)
    s11 = tl.zeros((BLOCK,), ct)
    for start in range(0, HW, BLOCK):
        p = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = p < HW
        xc = tl.load(x_ptr + n * s_n + c * s_c + p * s_p, mask=mask, other=0.0).to(ct)
        gc = tl.load(g_ptr + n * g_n + c * g_c + p * g_p, mask=mask, other=0.0).to(ct)
        xs = tl.load(x_ptr + n * s_n + cs * s_c + p * s_p, mask=mask, other=0.0).to(ct) if J == 2 else xc * 0
        if K == 2:
            b0 = a00 * xc + a01 * xs
            b1 = a10 * xc + a11 * xs
            g0 = gc * _win(b0, b1).to(ct)
            g1 = gc * _win(b1, b0).to(ct)
        else:
            g0 = gc
            g1 = gc * 0
        s00 += g0 * xc
        s01 += g0 * xs
        s10 += g1 * xc
        s11 += g1 * xs
        gxv = g0 * a00 + g1 * a10
        if J == 2:
            xi = tl.load(x_ptr + n * s_n + ci * s_c + p * s_p, mask=mask, other=0.0).to(ct)
            gi = tl.load(g_ptr + n * g_n + ci * g_c + p * g_p, mask=mask, other=0.0).to(ct)
            if K == 2:
                d0 = e00 * xi + e01 * xc
                d1 = e10 * xi + e11 * xc
                gxv = gxv + gi * _win(d0, d1).to(ct) * e01 + gi * _win(d1, d0).to(ct) * e11
            else:
                gxv = gxv + gi * e01
        tl.store(gx_ptr + n * s_n + c * s_c + p * s_p, gxv.to(gx_ptr.dtype.element_ty), mask=mask)
    out = gc_ptr + n * (K * J * C) + c
    ot = gc_ptr.dtype.element_ty
    tl.store(out, tl.sum(s00, axis=0).to(ot))
    if J == 2:
        tl.store(out + C, tl.sum(s01, axis=0).to(ot))
    if K == 2:
        tl.store(out + J * C, tl.sum(s10, axis=0).to(ot))
    if K * J == 4:
        tl.store(out + 3 * C, tl.sum(s11, axis=0).to(ot))


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_p) of a dense NCHW or channels-last map."""
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError("expected a dense NCHW or channels-last tensor")
    sn, sc, _, sw = t.stride()
    return sn, sc, sw


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def triton_forward(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """``dsm_forward`` on the GPU (or on the CPU under TRITON_INTERPRET=1)."""
    x = _dense(x)
    coef = coef.contiguous()
    n, c, h, w = x.shape
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, coef.dtype))
    grid = (n * c, triton.cdiv(h * w, FWD_BLOCK))
    f64 = y.dtype == torch.float64
    _dsm_fwd[grid](x, coef, index, y, c, h * w, *_strides(x), K=k, J=j, F64=f64, BLOCK=FWD_BLOCK)
    return y


def triton_backward(
    x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, grad: torch.Tensor, k: int, j: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dsm_backward`` on the GPU (or on the CPU under TRITON_INTERPRET=1)."""
    x, grad = _dense(x), _dense(grad)
    coef = coef.contiguous()
    n, c, h, w = x.shape
    gx, gc = torch.empty_like(x), torch.empty_like(coef)
    f64 = torch.promote_types(x.dtype, coef.dtype) == torch.float64
    _dsm_bwd[(n * c,)](x, coef, index, inverse, grad, gx, gc, c, h * w, *_strides(x), *_strides(grad),
                       K=k, J=j, F64=f64, BLOCK=BWD_BLOCK)  # fmt: skip
    return gx, gc
