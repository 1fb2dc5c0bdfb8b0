"""TorchScript and ``torch.export`` programs of a (deploy-mode) model, each with a dynamic batch axis."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .onnx import _example, _warm
from .result import ExportResult


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> ExportResult:
    """TorchScript by tracing (the deploy graph has no data-dependent control flow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(*input_shape)
    _warm(model, example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
    traced.save(str(path))
    return ExportResult(path, "torchscript", exporter="torch.jit.trace")


def export_program(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> ExportResult:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch axis; load with ``torch.export.load``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = _example(input_shape)
    _warm(model, example)
    with torch.no_grad():
        prog = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(prog, str(path))
    return ExportResult(path, "exported-program", exporter="torch.export")
