"""ncnn export (``.param``/``.bin`` through pnnx) and a loader with the ncnn Python package."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .metadata import sidecar, write_json_beside
from .native_log import converting
from .onnx import _warm
from .result import ConversionError, ExportResult

EXTRA = "pip install micronet-torch[ncnn]"


def weights_file(param: str | os.PathLike) -> Path:
    """The weights beside a ``.param``: ``<stem>.ncnn.bin`` (pnnx's own naming), never ``<stem>.bin``, the name of an
    OpenVINO IR's weights beside ``<stem>.xml``; ``m0.ncnn.param`` gets ``m0.ncnn.bin``."""
    param = Path(param)
    stem = param.name[: -len(param.suffix)] if param.suffix else param.name
    return param.with_name(stem.removesuffix(".ncnn") + ".ncnn.bin")


def export_ncnn(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Convert ``model`` with pnnx at a fixed ``input_shape``; writes ``<path>.param`` and its ``weights_file`` (and
    the ``sidecar`` json with ``metadata``: ncnn's param format has no place for it). Returns the ``.param`` path."""
    try:
        import pnnx  # optional heavy dependency: only when exporting
    except ImportError as err:
        raise ImportError(f"ncnn export needs the pnnx package: {EXTRA}") from err
    path = Path(path).with_suffix(".param")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "model.pt"
        _warm(model.eval(), torch.zeros(*input_shape))  # per-input-size constants (border maps) exist before tracing
        with torch.no_grad(), converting("pnnx") as log:  # pnnx's pass log and torch.jit's warnings
            pnnx.export(model.eval(), str(pt), (torch.randn(*input_shape),), fp16=False)  # fp32 weights
        if not (Path(tmp) / "model.ncnn.param").is_file() or not (Path(tmp) / "model.ncnn.bin").is_file():
            raise ConversionError(f"pnnx wrote no ncnn model; its log ends: {log.tail()}")
        shutil.copy(Path(tmp) / "model.ncnn.param", path)
        shutil.copy(Path(tmp) / "model.ncnn.bin", weights_file(path))
    write_json_beside(path, metadata)
    return path


def load_ncnn(path: str | os.PathLike, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ncnn model on batch-1 NCHW input (ncnn's blobs have no batch axis)."""
    try:
        import ncnn  # optional heavy dependency: only when running
    except ImportError as err:
        raise ImportError(f"running ncnn models needs the ncnn package: {EXTRA}") from err
    path = Path(path).with_suffix(".param")
    net = ncnn.Net()
    opt = ncnn.Option()  # fp32 throughout: ncnn otherwise stores and computes in fp16 where the CPU has it
    opt.num_threads = threads
    opt.use_fp16_packed = opt.use_fp16_storage = opt.use_fp16_arithmetic = False
    opt.use_bf16_storage = False
    opt.use_vulkan_compute = False
    net.opt = opt
    net.load_param(str(path))
    weights = weights_file(path)
    net.load_model(str(weights if weights.is_file() else path.with_suffix(".bin")))  # older exports: <stem>.bin

    def run(x: np.ndarray) -> np.ndarray:
        outs = []
        for sample in np.ascontiguousarray(x, dtype=np.float32):
            with net.create_extractor() as ex:
                ex.input("in0", ncnn.Mat(sample))
                _, out = ex.extract("out0")
                outs.append(np.array(out).reshape(-1))
        return np.stack(outs)

    return run


def export_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``ncnn`` target's converter: ``export_ncnn`` (weights in ``weights_file``, metadata in the sidecar)."""
    written = export_ncnn(model, path, input_shape, metadata)  # type: ignore[arg-type]
    res = ExportResult(written, "ncnn", exporter="pnnx (fp32)")
    res.notes += [f"weights in {weights_file(written).name}", "metadata in " + sidecar(written).name]
    return res


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[Any], np.ndarray]:
    """The ``ncnn`` target's loader (ncnn's blobs have no batch axis: it runs image by image itself)."""
    run = load_ncnn(path, threads)
    return lambda x: run(x.numpy())
