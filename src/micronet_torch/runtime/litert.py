"""LiteRT export (``.tflite`` through ``litert_torch.convert``) and a loader on the XNNPACK delegate."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .metadata import sidecar, write_json_beside
from .native_log import captured, converting
from .onnx import _warm
from .result import ExportResult, per_image

EXTRA = "pip install micronet-torch[litert]"


def export_litert(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Convert ``model`` at a fixed ``input_shape`` (NCHW input kept) to a ``.tflite`` flatbuffer; ``metadata``
    goes into a ``.json`` next to it (the flatbuffer's metadata table needs the TFLite support tooling)."""
    path = Path(path).with_suffix(".tflite")
    path.parent.mkdir(parents=True, exist_ok=True)
    _warm(model.eval(), torch.zeros(*input_shape))  # per-input-size constants (border maps) exist before tracing
    with converting("litert_torch"):  # its progress log and TensorFlow's start-up lines stay off the terminal
        try:
            import litert_torch  # optional heavy dependency: only when exporting
        except ImportError as err:
            raise ImportError(f"LiteRT export needs the litert-torch package: {EXTRA}") from err
        with torch.no_grad():
            edge_model = litert_torch.convert(model.eval(), (torch.randn(*input_shape),))
        edge_model.export(str(path))
    write_json_beside(path, metadata)
    return path


def load_litert(path: str | os.PathLike, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ``.tflite`` file with ai_edge_litert's Interpreter (XNNPACK is its default)."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # optional heavy dependency
    except ImportError as err:
        raise ImportError(f"running LiteRT models needs the ai-edge-litert package: {EXTRA}") from err
    with captured():  # the XNNPACK delegate announces itself on stderr
        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp, np.ascontiguousarray(x, dtype=np.float32))
        interp.invoke()
        return interp.get_tensor(out).copy()

    return run


def export_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``tflite`` target's converter: ``export_litert`` (metadata in the sidecar)."""
    written = export_litert(model, path, input_shape, metadata)  # type: ignore[arg-type]
    return ExportResult(
        written, "tflite", exporter="litert_torch.convert", notes=["metadata in " + sidecar(written).name]
    )


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``tflite`` target's loader: the batch-1 file run image by image."""
    return per_image(load_litert(path, threads))
