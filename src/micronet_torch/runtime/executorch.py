"""ExecuTorch export (``.pte`` lowered to XNNPACK), the operators left outside the delegate, and a loader."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..kernels import executorch_ops
from .metadata import sidecar, write_json_beside
from .native_log import captured, converting
from .onnx import _warm
from .result import ExportResult, per_image

EXTRA = "pip install micronet-torch[executorch]"
KERNEL_CALL = executorch_ops.KERNEL.replace("::", ".")  # how an exported program names a call of that kernel


def _require() -> None:
    try:
        import executorch  # noqa: F401  (optional heavy dependency: only when exporting or running .pte)
    except ImportError as err:
        raise ImportError(f"ExecuTorch export needs the executorch package: {EXTRA}") from err


def lower_xnnpack(model: nn.Module, input_shape: tuple[int, int, int, int], metadata: dict[str, Any] | None = None):
    """``torch.export`` at a static shape, then ``to_edge_transform_and_lower`` with the XNNPACK partitioner;
    numeric metadata (numbers, lists of numbers, also as JSON text) become constant methods of the program
    (read with ``load_method(name)``). A graph that calls ``micronet::shift_max`` (``fused_ops=True``) gets
    its out variant, and the edge dialect's ATen-only check is off for it."""
    _require()
    _warm(model.eval(), torch.zeros(*input_shape))  # per-input-size constants (border maps) exist before tracing
    constants = {k: v for k, v in map(_numeric, (metadata or {}).items()) if v is not None}
    # the import's deprecation warning (torch's) and the lowering's logs stay off the terminal
    with converting("torch.export + ExecuTorch's XNNPACK lowering"):
        # executorch is an optional heavy dependency: imported only when exporting to it
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

        with torch.no_grad():
            program = torch.export.export(model.eval(), (torch.randn(*input_shape),))
        config = None
        if any(KERNEL_CALL in str(node.target) for node in program.graph.nodes):
            executorch_ops.register_out_variant()
            config = EdgeCompileConfig(_check_ir_validity=False)
        return to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], constant_methods=constants, compile_config=config
        )


def ops_outside_delegate(edge: Any) -> list[str]:
    """Every operator the XNNPACK partitioner left to ExecuTorch's portable kernels (one entry per node)."""
    graph = edge.exported_program().graph_module.graph
    out = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name or name == "getitem":
            continue
        out.append(name)
    return out


# layout conversions the partitioner places between the delegate and constant buffers: data movement, not compute
LAYOUT_COPIES = ("_to_dim_order_copy", "_clone_dim_order", "_to_copy")
# the modules of a portable Dynamic Shift-Max (the twin conv computes its shift); PortableFusedShiftMax's kernel
# call is outside by design, its hyper-function is not
SHIFT_MAX_MODULES = ("PortableShiftMax", "TwinConvShiftMax", "PortableFusedShiftMax")


def shift_max_ops_outside(edge: Any) -> list[str]:
    """Operators of a Dynamic Shift-Max (by the module that produced them) left outside the delegate, layout
    copies and the ``micronet::shift_max`` kernel call excepted: any entry here means a Dynamic Shift-Max is not
    run by XNNPACK (or its kernel)."""
    graph = edge.exported_program().graph_module.graph
    out = []
    for node in graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op != "call_function" or "executorch_call_delegate" in name or name == "getitem":
            continue
        stack = [str(cls) for _, cls in (node.meta.get("nn_module_stack") or {}).values()]
        if KERNEL_CALL in str(node.target) or any(c in name for c in LAYOUT_COPIES):
            continue
        if any(m in cls for cls in stack for m in SHIFT_MAX_MODULES):
            out.append(name)
    return out


def delegate_count(edge: Any) -> int:
    """The number of XNNPACK partitions (delegate calls) in the lowered program."""
    graph = edge.exported_program().graph_module.graph
    return sum(1 for n in graph.nodes if "executorch_call_delegate" in str(n.target))


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the XNNPACK-lowered ``.pte`` program of ``model`` for a fixed ``input_shape`` (``metadata`` also in a
    ``.json`` next to it: constant methods hold numbers only)."""
    return write_executorch(model, path, input_shape, metadata)[0]


def write_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, DelegateReport]:
    """``export_executorch`` that also says what the XNNPACK delegate covers (read before ``to_executorch``,
    which rewrites the edge program in place into out-variants and allocations)."""
    path = Path(path).with_suffix(".pte")
    path.parent.mkdir(parents=True, exist_ok=True)
    edge = lower_xnnpack(model, input_shape, metadata)
    report = DelegateReport(delegate_count(edge), ops_outside_delegate(edge), shift_max_ops_outside(edge))
    path.write_bytes(edge.to_executorch().buffer)
    write_json_beside(path, metadata)
    return path, report


@dataclass
class DelegateReport:
    """How much of a program XNNPACK runs: its partitions, the operators outside, the Dynamic Shift-Max ones."""

    partitions: int
    outside: list[str]
    shift_max_outside: list[str]


def _numeric(item: tuple[str, Any]) -> tuple[str, Any]:
    """(key, value) with ``value`` as a number or a list of numbers when it is one (or JSON text of one), else
    None: ExecuTorch's constant methods hold numbers, not text."""
    key, value = item
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return key, None
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        return key, None
    if isinstance(value, list) and not (value and all(isinstance(v, int | float) for v in value)):
        return key, None
    return key, value


def load_executorch(path: str | os.PathLike, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ``.pte`` program's ``forward`` with ExecuTorch's Python runtime."""
    _require()
    from executorch.runtime import Runtime  # optional heavy dependency

    if executorch_ops.uses_kernels(path):  # written with --fused-ops: its micronet::shift_max needs the kernel
        executorch_ops.load_kernels()
    with captured():  # the threadpool's CPU probing logs to stderr on first use
        _set_threads(threads)
        method = Runtime.get().load_program(Path(path)).load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])[0].numpy()

    return run


def _set_threads(threads: int) -> None:
    """Size the threadpool XNNPACK uses (the Python runtime's default is every core)."""
    try:
        from executorch.extension.pybindings import portable_lib  # optional heavy dependency

        portable_lib._unsafe_reset_threadpool(threads)
    except (ImportError, AttributeError):
        pass


def export_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``executorch`` target's converter: ``write_executorch``, with what the delegate covers as notes and a
    Dynamic Shift-Max outside it as a failure (metadata: numeric entries as constant methods, all in the sidecar)."""
    written, report = write_executorch(model, path, input_shape, metadata)  # type: ignore[arg-type]
    fused = any(KERNEL_CALL in op for op in report.outside)
    how = "torch.export + XNNPACK partitioner" + (" + micronet::shift_max kernel" if fused else "")
    res = ExportResult(written, "executorch", exporter=how)
    counts = {op: report.outside.count(op) for op in dict.fromkeys(report.outside)}
    res.notes.append(
        f"{report.partitions} XNNPACK partition(s); outside the delegate: "
        + (", ".join(f"{n} x {op}" for op, n in counts.items()) if counts else "nothing")
    )
    res.notes.append(f"metadata: numeric entries as constant methods, all in {sidecar(written).name}")
    dsm = report.shift_max_outside
    if dsm:
        res.failures.append(f"Dynamic Shift-Max operators outside the XNNPACK delegate: {', '.join(sorted(set(dsm)))}")
    return res


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``executorch`` target's loader: the batch-1 program run image by image."""
    return per_image(load_executorch(path, threads))
