"""TorchScript and ``torch.export`` programs of a (deploy-mode) model, each with a dynamic batch axis."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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


def torchscript_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``torchscript`` target's converter (its metadata goes in afterwards: ``write_torchscript_metadata``)."""
    return export_torchscript(model, path, input_shape)


def program_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``exported-program`` target's converter (metadata afterwards: ``write_program_metadata``)."""
    return export_program(model, path, input_shape)


def _jit_load(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation warning on the user's terminal (TorchScript is the format asked
    for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def write_torchscript_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """``meta`` as the TorchScript archive's extra file ``metadata.json``."""
    mod = _jit_load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(mod, str(path), _extra_files={"metadata.json": json.dumps(meta)})


def write_program_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """``meta`` as the ``torch.export`` archive's extra file ``metadata.json``."""
    prog = torch.export.load(str(path))
    torch.export.save(prog, str(path), extra_files={"metadata.json": json.dumps(meta)})


def load_torchscript(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``torchscript`` target's loader."""
    mod = _jit_load(path)
    return lambda x: mod(x).detach().numpy()


def load_program(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``exported-program`` target's loader."""
    prog = torch.export.load(str(path)).module()
    return lambda x: prog(x).detach().numpy()
