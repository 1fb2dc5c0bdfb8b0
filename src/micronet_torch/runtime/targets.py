"""The table of export targets: for each ``micronet export --format``, everything about it in one row.

A row names the deploy backend its runtime runs fastest, the converter that writes the file (a function of the
format's own module), the loader that runs it, where its metadata goes and how it is read back, the other files
it writes beside the main one, the runtime-operator library and usage note of ``--fused-ops``, and the export
flags it takes. ``runtime/export.py``, ``micronet eval`` / ``predict`` and ``micronet bench`` read only the row,
so a new runtime is one module (converter, loader, metadata reader) plus one row here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deploy import RUNTIME_OPTIONS
from ..kernels import executorch_ops, openvino_ops
from ..kernels.ort_ops import library_path as ort_library_path
from . import executorch, litert, mcu, mcu_cpp, ncnn, onnx, openvino, ort, torch_export
from .metadata import read_archive_metadata, read_json_beside, read_onnx_metadata, read_openvino_metadata, sidecar
from .result import ExportResult

Runner = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class FusedOps:
    """What ``--fused-ops`` means for a target: the deploy graph with one operator per Dynamic Shift-Max, the
    native library that runs that operator, and how a user of the file loads it (``{library}``: its path)."""

    backend: str
    library: Callable[[], Path]
    usage: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One export format.

    ``export(graph, path, input_shape, options, metadata) -> ExportResult`` writes ``path`` (and its
    ``companions``); ``write_metadata(path, metadata)`` puts the metadata in afterwards (None: the converter
    writes it); ``read_metadata(path)`` reads it back; ``load(path, threads) -> run`` runs the file (a float
    tensor in, a numpy array out)."""

    name: str
    backend: str  # convert_to_deploy backend whose graph this runtime runs fastest
    suffix: str
    export: Callable[..., ExportResult]
    load: Callable[..., Runner]
    about: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # convert_to_deploy keywords for this runtime
    packages: tuple[str, ...] = ()  # optional Python packages the export and the loader need
    extra: str = ""  # the pip extra that installs them
    fixed_shape: bool = False  # the file has a fixed input shape (batch 1 unless asked otherwise) and this suffix
    read_metadata: Callable[[Path], dict[str, str]] = lambda path: {}
    write_metadata: Callable[[Path, dict[str, str]], None] | None = None
    companions: tuple[Callable[[Path], Path], ...] = ()  # the other files it writes, from the main file's path
    fused: FusedOps | None = None  # --fused-ops, where the runtime has an operator for it
    flags: frozenset[str] = frozenset()  # export options only this target takes: opset, int8, dynamic_batch
    runtime: str = "PyTorch"  # what runs the file, for messages
    run_packages: tuple[str, ...] | None = None  # the packages running a file needs (None: all of ``packages``)
    input_shape: Callable[[Path], list[Any]] | None = None  # the graph's declared input shape, read without running
    quantizes: bool = False  # the converter writes an int8 file from the --calib images and checks it itself
    int8_target: str | None = None  # the target that --int8 on this format selects (tflite: tflm)

    def missing(self, run_only: bool = False) -> str | None:
        """None when every package is importable (``run_only``: those that run a file), else one line naming the
        missing ones and the extra."""
        needed = self.packages if not run_only or self.run_packages is None else self.run_packages
        absent = [p for p in needed if importlib.util.find_spec(p) is None]
        if not absent:
            return None
        what = f"running {self.about} files" if run_only else f"--format {self.name}"
        return f"{what} needs {', '.join(absent)}: pip install micronet-torch[{self.extra}]"

    def main_file(self, output: str | os.PathLike) -> Path:
        """The file an export to ``output`` writes (fixed-shape runtimes give it their suffix)."""
        path = Path(output)
        return path.with_suffix(self.suffix) if self.fixed_shape else path

    def files(self, output: str | os.PathLike) -> list[Path]:
        """Every file an export to ``output`` writes: the companions, then the main file."""
        main = self.main_file(output)
        return [companion(main) for companion in self.companions] + [main]


def _portable(name: str) -> dict[str, Any]:
    """The row fields every portable-graph runtime shares: its deploy options, fixed shape, its pip extra."""
    return dict(backend="portable", options=dict(RUNTIME_OPTIONS[name]), extra=name, fixed_shape=True)


TARGETS: dict[str, Target] = {
    "onnx": Target(
        "onnx",
        "onnx",
        ".onnx",
        onnx.export_target,
        ort.load_runner,
        "ONNX (ONNX Runtime and any ONNX runtime)",
        read_metadata=read_onnx_metadata,
        write_metadata=onnx.write_metadata,
        fused=FusedOps(
            "onnx",
            ort_library_path,
            "uses the micronet.ShiftMax operator; ONNX Runtime sessions need "
            "SessionOptions.register_custom_ops_library('{library}') (micronet_torch.fused_ops.register)",
        ),
        flags=frozenset({"opset", "int8"}),
        runtime="ONNX Runtime",
        input_shape=onnx.declared_input_shape,
    ),
    "torchscript": Target(
        "torchscript",
        "eager",
        ".ts",
        torch_export.torchscript_target,
        torch_export.load_torchscript,
        "TorchScript",
        read_metadata=read_archive_metadata,
        write_metadata=torch_export.write_torchscript_metadata,
    ),
    "exported-program": Target(
        "exported-program",
        "eager",
        ".pt2",
        torch_export.program_target,
        torch_export.load_program,
        "torch.export program",
        read_metadata=read_archive_metadata,
        write_metadata=torch_export.write_program_metadata,
    ),
    "openvino": Target(
        "openvino",
        suffix=".xml",
        export=openvino.export_target,
        load=openvino.load_runner,
        about="OpenVINO IR (.xml + .bin)",
        packages=("openvino",),
        read_metadata=read_openvino_metadata,
        companions=(openvino.weights_file,),
        fused=FusedOps(
            "onnx",
            openvino_ops.library_path,
            "uses the micronet.ShiftMax operation; an openvino.Core needs core.add_extension('{library}')",
        ),
        flags=frozenset({"dynamic_batch"}),
        runtime="OpenVINO",
        **_portable("openvino"),
    ),
    "executorch": Target(
        "executorch",
        suffix=".pte",
        export=executorch.export_target,
        load=executorch.load_runner,
        about="ExecuTorch program lowered to XNNPACK",
        packages=("executorch",),
        read_metadata=read_json_beside,
        companions=(sidecar,),
        fused=FusedOps(
            "portable",
            executorch_ops.library_path,
            "calls the micronet::shift_max kernel; load it before the program: "
            "ctypes.CDLL('{library}', mode=ctypes.RTLD_GLOBAL)",
            dict(RUNTIME_OPTIONS["executorch"]),
        ),
        runtime="ExecuTorch",
        **_portable("executorch"),
    ),
    "tflite": Target(
        "tflite",
        suffix=".tflite",
        export=litert.export_target,
        load=litert.load_runner,
        about="LiteRT flatbuffer",
        packages=("litert_torch", "ai_edge_litert"),
        read_metadata=read_json_beside,
        companions=(sidecar,),
        runtime="LiteRT",
        run_packages=("ai_edge_litert",),
        int8_target="tflm",
        **_portable("litert"),
    ),
    "tflm": Target(
        "tflm",
        "mcu",
        ".tflite",
        mcu.export_target,
        mcu.load_runner,
        "fully int8 LiteRT flatbuffer for TensorFlow Lite Micro (+ C++ pair)",
        packages=("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "tflite_micro"),
        extra="mcu",
        fixed_shape=True,
        read_metadata=read_json_beside,
        companions=(mcu_cpp.cpp_header, mcu_cpp.cpp_source, sidecar),
        flags=frozenset({"calib"}),
        runtime="LiteRT (reference kernels, int8)",
        run_packages=("ai_edge_litert",),
        quantizes=True,
    ),
    "ncnn": Target(
        "ncnn",
        suffix=".param",
        export=ncnn.export_target,
        load=ncnn.load_runner,
        about="ncnn (.param + .ncnn.bin)",
        packages=("pnnx", "ncnn"),
        read_metadata=read_json_beside,
        companions=(ncnn.weights_file, sidecar),
        runtime="ncnn",
        run_packages=("ncnn",),
        **_portable("ncnn"),
    ),
}
FORMATS = tuple(TARGETS)


def load_exported(path: str | os.PathLike, fmt: str, threads: int = 1) -> Runner:
    """A callable running an exported file on a float tensor (returns a numpy array)."""
    return TARGETS[fmt].load(Path(path), threads)


def target_of_file(path: str | os.PathLike) -> Target | None:
    """The target whose files end like ``path`` (``.onnx``, ``.xml``, ``.pte``, ...), or None; where two share a
    suffix (``tflite`` and its int8 form ``tflm``), the one the file's metadata names, else the first."""
    suffix = Path(path).suffix.lower()
    matches = [t for t in TARGETS.values() if t.suffix == suffix]
    if len(matches) > 1:
        for target in matches:
            try:
                if target.read_metadata(Path(path)).get("export_format") == target.name:
                    return target
            except Exception:  # unreadable metadata: the loader's own error names it
                break
    return matches[0] if matches else None
