"""ONNX Runtime: CPU sessions (with the fused operator library when a file needs it) and static int8 quantization."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import default_policy
from ..kernels.ort_ops import register as register_fused_ops
from ..kernels.ort_ops import uses_fused_ops
from ..models import LoadedModel, published_data_config
from .metadata import data_config_from_metadata, read_onnx_metadata
from .onnx import count_nodes

INT8_FORMATS = ("qdq", "qoperator")


def _session_options(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """CPU session options: ``threads`` intra-op threads, all graph optimizations (or none), and the
    ``micronet`` operator library when the file uses it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if uses_fused_ops(path):
        register_fused_ops(so)
    return so


def ort_session(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and all graph optimizations."""
    import onnxruntime as ort

    so = _session_options(path, threads, optimize)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_nodes_after_optimization(path: str | os.PathLike) -> int:
    """Node count of the graph ONNX Runtime actually runs (after its own fusions, ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        so = _session_options(path)
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return count_nodes(out)


def run_ort(session: Any, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Run a session over ``x`` in chunks; returns the stacked first output."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch].numpy()})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``onnx`` target's loader: a function running the file in an ONNX Runtime CPU session."""
    sess = ort_session(path, threads)
    return lambda x: run_ort(sess, x)


class _Reader:
    """ONNX Runtime calibration data reader over a float tensor, a few images per call."""

    def __init__(self, name: str, x: torch.Tensor, batch: int = 16) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i : self.i + self.batch].numpy()}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def quantize_onnx(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calib: torch.Tensor,
    fmt: str = "qdq",
    per_channel: bool = True,
    op_types: tuple[str, ...] | None = ("Conv", "Gemm"),
    float_convs: int = 0,
) -> Path:
    """Static int8 quantization (ORT ``quantize_static``, MinMax calibration over ``calib``).

    ``op_types`` limits quantization to the convolutions and linears by default: Dynamic Shift-Max's
    products stay in float, which keeps its input-dependent coefficients exact. ``float_convs`` keeps the
    first that many convolution layers (graph order; the Conv nodes of one ``RowFoldedConv`` share their
    input and count once) and, when it is > 0, the two head linears in float: the
    early, high-resolution layers are the ones whose 8-bit rounding flips predictions (``docs/deploy.md``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in INT8_FORMATS:
        raise ValueError(f"unknown int8 format {fmt!r}; choose one of {INT8_FORMATS}")
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            except Exception:
                pre = Path(fp32_path)
        name = ort_session(pre, optimize=False).get_inputs()[0].name
        exclude: list[str] = []
        if float_convs > 0:
            import onnx

            graph = onnx.load(str(pre)).graph
            layers: dict[str, int] = {}  # a row-folded conv's m Conv nodes read one input: one layer
            for n in graph.node:
                if n.op_type == "Conv":
                    layer = layers.setdefault(n.input[0], len(layers))
                    if layer < float_convs:
                        exclude.append(n.name)
            exclude += [n.name for n in graph.node if n.op_type == "Gemm"][-2:]
        quantize_static(
            str(pre),
            str(int8_path),
            _Reader(name, calib),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=exclude,
        )
    return int8_path


class OrtModel(nn.Module):
    """An ONNX file run by ONNX Runtime behind the ``nn.Module`` call of a PyTorch model (CPU, float32 in/out).

    Lets ``micronet eval`` / ``predict`` (and ``train.metrics.evaluate``) run fp32, int8 and ``--fused-ops`` files
    through the same loop as a checkpoint; ``ort_session`` registers the fused operator library when needed.
    """

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = ort_session(self.path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(run_ort(self.session, x))


def load_onnx_model(path: str | os.PathLike, img_size: int | None = None, threads: int = 1) -> LoadedModel:
    """An ONNX export as a ``LoadedModel``: preprocessing, classes and name from its metadata (``runtime.metadata``).

    A file without metadata (exported elsewhere) gets its input size from the graph, the published ImageNet
    transform and ``class_<i>`` names, with a warning saying so.
    """
    model = OrtModel(path, threads)
    meta = read_onnx_metadata(path)
    dcfg = data_config_from_metadata(meta)
    shape = model.session.get_inputs()[0].shape
    if dcfg is None:
        size = shape[-1] if isinstance(shape[-1], int) else None
        chans = shape[1] if isinstance(shape[1], int) else 3
        dcfg = published_data_config(size, chans)
        print(
            f"warning: {path} carries no micronet-torch metadata; assuming {dcfg.img_size} px, ImageNet mean/std "
            "and the published resize/crop",
            file=sys.stderr,
        )
    if img_size and img_size != dcfg.img_size:
        if isinstance(shape[-1], int):
            raise ValueError(f"--img-size {img_size}: {path} takes {shape[-1]} px inputs only")
        dcfg.img_size, dcfg.policy = img_size, default_policy(img_size)
    names = json.loads(meta["class_names"]) if "class_names" in meta else []
    out_shape = model.session.get_outputs()[0].shape
    n_cls = out_shape[-1] if isinstance(out_shape[-1], int) else len(names)
    if not names or len(names) != n_cls:
        names = [f"class_{i}" for i in range(n_cls)]
    name = meta.get("model_name", Path(path).stem)
    return LoadedModel(model.eval(), name, dcfg, [str(c) for c in names], "onnx", {"metadata": meta})
