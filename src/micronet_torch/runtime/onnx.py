"""ONNX export with a dynamic batch axis: the dynamo exporter (the legacy one as fallback), then onnxslim."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels.ort_ops import onnx_translation_table
from .metadata import write_onnx_metadata
from .result import ConversionError, ExportResult

DEFAULT_OPSET = 18
MIN_OPSET = 7  # the legacy exporter's oldest; it writes 7-20, the dynamo one 18 and up


def check_opset(opset: int) -> None:
    """Refuse an opset older than any exporter writes or newer than the installed onnx knows, naming the flag
    (the file's opset is checked again after writing: no request is silently changed)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"--opset {opset}: ONNX export writes opsets {MIN_OPSET}-{newest} (onnx {onnx.__version__})")


def _default_opset(proto: Any) -> int:
    """The default-domain opset an ONNX ``ModelProto`` declares."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _example(input_shape: tuple[int, ...]) -> torch.Tensor:
    """An example input with batch 2: batch 1 would let torch.export specialise the batch axis to 1."""
    return torch.randn(max(2, input_shape[0]), *input_shape[1:])


def _warm(model: nn.Module, example: torch.Tensor) -> None:
    """Run the model once before tracing: deploy modules build their per-input-size constants (border maps,
    row-folded weights) on first use, and a tracer would otherwise record that arithmetic instead of constants
    (float64 arithmetic, which LiteRT cannot legalize). Every exporter calls it. Skipped in training mode,
    where a forward pass would move BatchNorm's running statistics."""
    if not model.training:
        with torch.no_grad():
            model(example)


def count_nodes(path: str | os.PathLike) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _onnx_dynamo(model: nn.Module, path: Path, example: torch.Tensor, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
            optimize=True,
            custom_translation_table=onnx_translation_table(),
        )
        prog.save(str(path), external_data=False)


def _onnx_legacy(model: nn.Module, path: Path, example: torch.Tensor, opset: int) -> None:
    if any(getattr(m, "fused_op", False) for m in model.modules()):
        raise RuntimeError("the micronet.ShiftMax operator (--fused-ops) needs the dynamo exporter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    simplify: bool = True,
) -> ExportResult:
    """ONNX with a dynamic batch axis: the dynamo exporter, the legacy one if it fails (``exporter='auto'``).

    ``simplify`` runs onnxslim and keeps its result only when it has fewer nodes.
    """
    import onnx

    check_opset(opset)  # before any work
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(input_shape)
    _warm(model, example)
    result = ExportResult(path, "onnx")
    order = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    errors = []
    for name in order:
        try:
            (_onnx_dynamo if name == "dynamo" else _onnx_legacy)(model, path, example, opset)
            written = onnx.load(str(path), load_external_data=False)
            got = _default_opset(written)
            if got != opset:  # dynamo writes 18+ whatever was asked, the legacy exporter at most 20
                raise RuntimeError(f"it wrote opset {got}, not the requested {opset}")
            result.exporter = name
            break
        except Exception as err:
            errors.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    else:
        raise ConversionError("ONNX export failed: " + "; ".join(errors))
    if errors:
        result.notes.append("fell back to the legacy exporter (" + errors[0] + ")")
    result.nodes = result.nodes_before_slim = len(written.graph.node)
    if simplify:
        result.nodes = _slim(path, result)
    return result


def _slim(path: Path, result: ExportResult) -> int:
    try:
        import onnxslim
    except ImportError:
        result.notes.append("onnxslim not installed: graph not simplified")
        return count_nodes(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slim.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                onnxslim.slim(str(path), str(out))
            except Exception as err:
                result.notes.append(f"onnxslim failed ({type(err).__name__}); graph kept as exported")
                return count_nodes(path)
        slim_nodes = count_nodes(out)
        if slim_nodes < count_nodes(path):
            os.replace(out, path)
            result.notes.append(f"onnxslim: {result.nodes_before_slim} -> {slim_nodes} nodes")
            return slim_nodes
    return count_nodes(path)


def export_target(
    model: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``onnx`` target's converter: ``export_onnx`` with the options' opset, exporter and onnxslim setting
    (the metadata goes in afterwards, ``write_metadata``: a dynamic batch axis)."""
    return export_onnx(model, path, input_shape, options.opset, options.exporter, options.simplify)


def write_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """``meta`` as the file's ``metadata_props``, its input size with the dynamic batch axis first."""
    sizes = json.loads(meta["input_size"]) if "input_size" in meta else None
    write_onnx_metadata(path, {**meta, **({"input_size": json.dumps(["batch", *sizes])} if sizes else {})})


def declared_input_shape(path: str | os.PathLike) -> list[int | str]:
    """The first graph input's shape as the file declares it (a number per fixed axis, a name per dynamic one)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    first = next(i for i in graph.input if i.name not in weights)
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in first.type.tensor_type.shape.dim]
