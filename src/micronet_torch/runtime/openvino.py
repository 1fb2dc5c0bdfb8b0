"""OpenVINO IR export (``.xml``/``.bin``, fp32) and a loader for parity checks and benchmarks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..kernels import openvino_ops
from .native_log import converting
from .onnx import _warm, export_onnx
from .result import ExportResult

EXTRA = "pip install micronet-torch[openvino]"


def _openvino() -> Any:
    try:
        import openvino  # optional heavy dependency: only when exporting or running IR
    except ImportError as err:
        raise ImportError(f"OpenVINO export needs the openvino package: {EXTRA}") from err
    return openvino


def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    metadata: dict[str, Any] | None = None,
    dynamic_batch: bool = False,
    fused_ops: bool = False,
) -> Path:
    """Convert ``model`` to an fp32 OpenVINO IR with its input shape fixed (OpenVINO fuses the Dynamic Shift-Max
    elementwise chains only with static shapes); ``metadata`` goes into the IR's ``rt_info`` under ``micronet``.

    ``fused_ops``: ``model`` is a deploy graph with ``micronet.ShiftMax`` operators (``convert_to_deploy(...,
    fused_ops=True)``); it goes through ONNX, whose ``micronet.ShiftMax`` nodes the extension of
    ``openvino_ops`` maps onto its operation.
    """
    ov = _openvino()
    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(*input_shape)
    shape = [-1, *input_shape[1:]] if dynamic_batch else list(input_shape)
    _warm(model.eval(), torch.zeros(*input_shape))  # per-input-size constants (border maps) exist before tracing
    if fused_ops:
        library = openvino_ops.extension_path()  # a private copy of the checked library
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            onnx_file = export_onnx(model, Path(tmp) / "fused.onnx", input_shape, simplify=False).path
            with converting("openvino.convert_model"):
                ov_model = ov.convert_model(str(onnx_file), extension=library, input=[shape])
        metadata = {**(metadata or {}), "custom_ops": f"{openvino_ops.OP_VERSION}.{openvino_ops.OP_TYPE}"}
    else:
        with torch.no_grad(), converting("openvino.convert_model"):  # its torch.jit trace warns on stderr
            ov_model = ov.convert_model(model.eval(), example_input=(example,), input=[shape])
    ov_model.inputs[0].get_tensor().set_names({"input"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    for key, value in (metadata or {}).items():
        ov_model.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["micronet", key])
    ov.save_model(ov_model, str(path), compress_to_fp16=False)
    return path


def weights_file(xml: str | os.PathLike) -> Path:
    """The ``.bin`` an IR's ``.xml`` reads its weights from (OpenVINO finds it by the stem)."""
    return Path(xml).with_suffix(".bin")


def load_openvino(path: str | os.PathLike, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the IR on OpenVINO's CPU plugin in fp32 with ``threads`` threads; an IR with a fixed
    batch runs a larger input in chunks of that batch."""
    ov = _openvino()
    core = ov.Core()
    if openvino_ops.uses_extension(path):  # written with --fused-ops: its micronet.ShiftMax needs the extension
        core.add_extension(openvino_ops.extension_path())
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(str(Path(path).with_suffix(".xml")), "CPU", config)
    request = compiled.create_infer_request()
    batch = compiled.inputs[0].get_partial_shape()[0]
    fixed = None if batch.is_dynamic else batch.get_length()

    def run_one(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return request.get_output_tensor(0).data.copy()

    def run(x: np.ndarray) -> np.ndarray:
        if fixed is None or len(x) == fixed:
            return run_one(x)
        return np.concatenate([run_one(x[i : i + fixed]) for i in range(0, len(x), fixed)])  # fixed-shape IR

    return run


def export_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``openvino`` target's converter: ``export_openvino`` (metadata in ``rt_info``), with the options'
    ``dynamic_batch`` and ``fused_ops``."""
    dynamic, fused = bool(options.dynamic_batch), bool(options.fused_ops)
    written = export_openvino(model, path, input_shape, metadata, dynamic, fused)  # type: ignore[arg-type]
    how = "ONNX with micronet.ShiftMax + openvino.convert_model" if fused else "openvino.convert_model"
    res = ExportResult(written, "openvino", exporter=f"{how} (fp32 IR)")
    res.notes.append(f"input {'batch dynamic' if dynamic else 'shape fixed to ' + 'x'.join(map(str, input_shape))}")
    return res


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``openvino`` target's loader (a tensor in, a numpy array out)."""
    run = load_openvino(path, threads)
    return lambda x: run(x.numpy())
