"""Parity of an exported file with PyTorch: fp32 logits within a tolerance, int8 top-1 agreement."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .ort import ort_session, run_ort
from .result import ExportResult
from .targets import load_exported

FP32_TOLERANCE = 1e-4  # relative to max|logits|
INT8_MIN_AGREEMENT = 0.99


@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def check_fp32(result: ExportResult, model: nn.Module, x: torch.Tensor) -> ExportResult:
    """max|exported - PyTorch| relative to max|PyTorch logits| over ``x``."""
    ref = reference_logits(model, x).numpy()
    out = load_exported(result.path, result.format)(x)
    result.max_abs_diff = float(np.abs(out - ref).max())
    result.rel_diff = result.max_abs_diff / max(float(np.abs(ref).max()), 1e-12)
    result.n_checked = len(x)
    return result


def check_int8(result: ExportResult, model: nn.Module, x: torch.Tensor) -> ExportResult:
    """Top-1 agreement of the int8 ONNX model with fp32 PyTorch over ``x``."""
    ref = reference_logits(model, x).numpy().argmax(1)
    out = run_ort(ort_session(result.path), x).argmax(1)
    result.agreement = float((out == ref).mean())
    result.n_checked = len(x)
    return result
