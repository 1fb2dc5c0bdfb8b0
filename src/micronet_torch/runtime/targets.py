"""The table of export targets: for each ``micronet export --format``, the deploy backend it wants, the file it
writes, how it is written and how it is run for the parity check. ``micronet export`` and ``micronet bench``
both read it, so a new runtime is one row here plus its exporter module."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deploy import RUNTIME_OPTIONS
from . import executorch, litert, ncnn, openvino
from .onnx import export_onnx
from .ort import ort_session, run_ort
from .result import ExportResult
from .torch_export import export_program, export_torchscript

Runner = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class Target:
    """One export format: ``export(model, path, input_shape, **options) -> ExportResult`` and
    ``load(path, threads) -> run`` (a float tensor in, a numpy array out)."""

    name: str
    backend: str  # convert_to_deploy backend whose graph this runtime runs fastest
    suffix: str
    export: Callable[..., ExportResult]
    load: Callable[..., Runner]
    about: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # convert_to_deploy keywords for this runtime
    packages: tuple[str, ...] = ()  # optional Python packages the export and the loader need
    extra: str = ""  # the pip extra that installs them
    fixed_shape: bool = False  # the file has a fixed input shape (batch 1 unless asked otherwise)

    def missing(self) -> str | None:
        """None when every package is importable, else one line naming the missing ones and the extra."""
        absent = [p for p in self.packages if importlib.util.find_spec(p) is None]
        if not absent:
            return None
        return f"--format {self.name} needs {', '.join(absent)}: pip install micronet-torch[{self.extra}]"


def _per_image(run: Callable[[np.ndarray], np.ndarray]) -> Runner:
    """A batch-1 program run over a batch image by image (the file is what a user gets: fixed shape)."""
    return lambda x: np.concatenate([run(x[i : i + 1].numpy()) for i in range(len(x))])


def _load_onnx(path: Path, threads: int = 1) -> Runner:
    sess = ort_session(path, threads)
    return lambda x: run_ort(sess, x)


def _load_torchscript(path: Path, threads: int = 1) -> Runner:
    mod = torch.jit.load(str(path))
    return lambda x: mod(x).detach().numpy()


def _load_program(path: Path, threads: int = 1) -> Runner:
    prog = torch.export.load(str(path)).module()
    return lambda x: prog(x).detach().numpy()


def _load_openvino(path: Path, threads: int = 1) -> Runner:
    run = openvino.load_openvino(path, threads)
    return lambda x: run(x.numpy())


def _load_executorch(path: Path, threads: int = 1) -> Runner:
    return _per_image(executorch.load_executorch(path, threads))


def _load_litert(path: Path, threads: int = 1) -> Runner:
    return _per_image(litert.load_litert(path, threads))


def _load_ncnn(path: Path, threads: int = 1) -> Runner:
    run = ncnn.load_ncnn(path, threads)  # ncnn's blobs have no batch axis: it runs image by image itself
    return lambda x: run(x.numpy())


def _export_onnx(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    options.pop("metadata", None)  # ONNX metadata_props: runtime/metadata.py's export_metadata, on its own branch
    options.pop("dynamic_batch", None)  # always dynamic
    return export_onnx(model, path, shape, **options)


def _export_torchscript(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    return export_torchscript(model, path, shape)


def _export_program(model: nn.Module, path: Path, shape: tuple[int, ...], **options: Any) -> ExportResult:
    return export_program(model, path, shape)


def _export_openvino(
    model: nn.Module, path: Path, shape: tuple[int, ...], metadata: dict | None = None, **options: Any
) -> ExportResult:
    dynamic, fused = bool(options.get("dynamic_batch")), bool(options.get("fused_ops"))
    written = openvino.export_openvino(model, path, shape, metadata, dynamic, fused)  # type: ignore[arg-type]
    how = "ONNX with micronet.ShiftMax + openvino.convert_model" if fused else "openvino.convert_model"
    res = ExportResult(written, "openvino", exporter=f"{how} (fp32 IR)")
    res.notes.append(f"input {'batch dynamic' if dynamic else 'shape fixed to ' + 'x'.join(map(str, shape))}")
    return res


def _export_executorch(
    model: nn.Module, path: Path, shape: tuple[int, ...], metadata: dict | None = None, **options: Any
) -> ExportResult:
    written, report = executorch.write_executorch(model, path, shape, metadata)  # type: ignore[arg-type]
    fused = any(executorch.KERNEL_CALL in op for op in report.outside)
    how = "torch.export + XNNPACK partitioner" + (" + micronet::shift_max kernel" if fused else "")
    res = ExportResult(written, "executorch", exporter=how)
    counts = {op: report.outside.count(op) for op in dict.fromkeys(report.outside)}
    res.notes.append(
        f"{report.partitions} XNNPACK partition(s); outside the delegate: "
        + (", ".join(f"{n} x {op}" for op, n in counts.items()) if counts else "nothing")
    )
    res.notes.append(f"metadata: numeric entries as constant methods, all in {_json(written)}")
    dsm = report.shift_max_outside
    if dsm:
        res.failures.append(f"Dynamic Shift-Max operators outside the XNNPACK delegate: {', '.join(sorted(set(dsm)))}")
    return res


def _export_litert(
    model: nn.Module, path: Path, shape: tuple[int, ...], metadata: dict | None = None, **options: Any
) -> ExportResult:
    written = litert.export_litert(model, path, shape, metadata)  # type: ignore[arg-type]
    return ExportResult(written, "tflite", exporter="litert_torch.convert", notes=["metadata in " + _json(written)])


def _export_ncnn(
    model: nn.Module, path: Path, shape: tuple[int, ...], metadata: dict | None = None, **options: Any
) -> ExportResult:
    written = ncnn.export_ncnn(model, path, shape, metadata)  # type: ignore[arg-type]
    res = ExportResult(written, "ncnn", exporter="pnnx (fp32)")
    res.notes += [f"weights in {written.with_suffix('.bin').name}", "metadata in " + _json(written)]
    return res


def _json(path: Path) -> str:
    return path.with_suffix(".json").name


def _runtime(name: str, rt: str, suffix: str, export: Callable, load: Callable, about: str, packages: tuple) -> Target:
    return Target(name, "portable", suffix, export, load, about, dict(RUNTIME_OPTIONS[rt]), packages, rt, True)


TARGETS: dict[str, Target] = {
    "onnx": Target("onnx", "onnx", ".onnx", _export_onnx, _load_onnx, "ONNX (ONNX Runtime and any ONNX runtime)"),
    "torchscript": Target("torchscript", "eager", ".ts", _export_torchscript, _load_torchscript, "TorchScript"),
    "exported-program": Target(
        "exported-program", "eager", ".pt2", _export_program, _load_program, "torch.export program"
    ),
    "openvino": _runtime(
        "openvino", "openvino", ".xml", _export_openvino, _load_openvino, "OpenVINO IR (.xml + .bin)", ("openvino",)
    ),
    "executorch": _runtime(
        "executorch",
        "executorch",
        ".pte",
        _export_executorch,
        _load_executorch,
        "ExecuTorch program lowered to XNNPACK",
        ("executorch",),
    ),
    "tflite": _runtime(
        "tflite",
        "litert",
        ".tflite",
        _export_litert,
        _load_litert,
        "LiteRT flatbuffer",
        ("litert_torch", "ai_edge_litert"),
    ),
    "ncnn": _runtime("ncnn", "ncnn", ".param", _export_ncnn, _load_ncnn, "ncnn (.param + .bin)", ("pnnx", "ncnn")),
}
FORMATS = tuple(TARGETS)


def load_exported(path: str | os.PathLike, fmt: str, threads: int = 1) -> Runner:
    """A callable running an exported file on a float tensor (returns a numpy array)."""
    return TARGETS[fmt].load(Path(path), threads)
