"""The table of export targets: for each ``micronet export --format``, the deploy backend it wants, the file it
writes, how it is written and how it is run for the parity check. ``micronet export`` and ``micronet bench``
both read it, so a new runtime is one row here plus its exporter module."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .onnx import export_onnx
from .ort import ort_session, run_ort
from .result import ExportResult
from .torch_export import export_program, export_torchscript

Runner = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class Target:
    """One export format: ``export(model, path, input_shape, **options) -> ExportResult`` and ``load(path) -> run``."""

    name: str
    backend: str  # convert_to_deploy backend whose graph this runtime runs fastest
    suffix: str
    export: Callable[..., ExportResult]
    load: Callable[[Path], Runner]
    about: str = ""


def _load_onnx(path: Path) -> Runner:
    sess = ort_session(path)
    return lambda x: run_ort(sess, x)


def _load_torchscript(path: Path) -> Runner:
    mod = torch.jit.load(str(path))
    return lambda x: mod(x).detach().numpy()


def _load_program(path: Path) -> Runner:
    prog = torch.export.load(str(path)).module()
    return lambda x: prog(x).detach().numpy()


def _export_onnx(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    return export_onnx(model, path, shape, **options)


def _export_torchscript(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    return export_torchscript(model, path, shape)


def _export_program(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    return export_program(model, path, shape)


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "onnx", ".onnx", _export_onnx, _load_onnx, "ONNX (ONNX Runtime and any ONNX runtime)"),
    "torchscript": Target("torchscript", "eager", ".ts", _export_torchscript, _load_torchscript, "TorchScript"),
    "exported-program": Target(
        "exported-program", "eager", ".pt2", _export_program, _load_program, "torch.export program"
    ),
}
FORMATS = tuple(TARGETS)


def load_exported(path: str | os.PathLike, fmt: str) -> Runner:
    """A callable running an exported file on a float tensor (returns a numpy array)."""
    return TARGETS[fmt].load(Path(path))
