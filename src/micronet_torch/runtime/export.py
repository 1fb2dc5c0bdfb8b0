"""Export a model (deploy mode by default) to a target of ``targets.TARGETS``, check it, and optionally quantize.

``export_model`` is the one pipeline from an eval-mode model to a written file (deploy conversion for the
target's backend, export); ``export_and_check`` adds what ``micronet export`` promises: fp32 parity with
PyTorch on a batch of 3 (also checks the dynamic batch axis; a fixed-shape file runs it image by image) and,
for int8, top-1 agreement on real images. The file carries ``metadata.export_metadata`` where its format can.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy import convert_to_deploy
from ..kernels import executorch_ops, openvino_ops
from ..kernels.ort_ops import FusedOpsUnavailable, library_path
from ..models import LoadedModel
from .calibration import calibration_images
from .metadata import export_metadata, write_onnx_metadata
from .onnx import DEFAULT_OPSET, check_opset
from .ort import INT8_FORMATS, quantize_onnx
from .parity import FP32_TOLERANCE, INT8_MIN_AGREEMENT, check_fp32, check_int8
from .result import ExportResult
from .targets import TARGETS


class ExportError(ValueError):
    """Export options that cannot work together, or a runtime that is missing; the message says what to do."""


@dataclass
class ExportOptions:
    """Every ``micronet export`` setting beyond the model and the output file."""

    format: str = "onnx"
    deploy: bool = True
    fused_ops: bool = False
    opset: int = DEFAULT_OPSET
    exporter: str = "auto"
    simplify: bool = True
    int8: bool = False
    calib: str | None = None
    calib_count: int = 512
    int8_format: str = "qdq"
    per_channel: bool = True
    float_convs: int = 0
    skip_bad_images: bool = False  # calibration: skip unreadable images (named) instead of stopping
    keep_failed: bool = False  # int8: keep a file that fails its check, as OUTPUT-FAILED.onnx
    dynamic_batch: bool = False  # OpenVINO: keep the batch axis dynamic (fixed-shape IRs fuse more)

    def validate(self) -> None:
        """Refuse combinations that cannot work, naming the flags; a missing runtime names its pip extra."""
        if self.format not in TARGETS:
            raise ExportError(f"--format {self.format}: choose one of {', '.join(TARGETS)}")
        missing = TARGETS[self.format].missing()
        if missing:
            raise ExportError(missing)
        if self.format == "onnx":
            check_opset(self.opset)
        if self.dynamic_batch and self.format != "openvino":
            raise ExportError("--dynamic-batch is for --format openvino (ONNX always has a dynamic batch axis)")
        if self.int8 and self.format != "onnx":
            raise ExportError("--int8 needs --format onnx (quantization runs in ONNX Runtime)")
        if self.int8 and not self.calib:
            raise ExportError("--int8 needs --calib DIR (an image folder, or fashion-mnist)")
        if self.int8_format not in INT8_FORMATS:
            raise ExportError(f"--int8-format {self.int8_format}: choose one of {', '.join(INT8_FORMATS)}")
        if self.fused_ops:
            clash = [
                flag
                for flag, on in (
                    ("--format " + self.format, self.format not in ("onnx", "openvino", "executorch")),
                    ("--no-deploy", not self.deploy),
                    ("--int8", self.int8),
                    ("--exporter legacy", self.exporter == "legacy"),
                    (f"--opset {self.opset} (the dynamo exporter writes 18 and up)", self.opset < 18),
                )
                if on
            ]
            if clash:
                raise ExportError(
                    "--fused-ops writes an fp32 ONNX (or OpenVINO / ExecuTorch) deploy graph; drop " + ", ".join(clash)
                )


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    options: ExportOptions,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Convert ``model`` for the target's backend and options (unless ``options.deploy`` is off) and write it to
    ``path``; a runtime whose package is missing raises ``ExportError`` naming the pip extra."""
    target = TARGETS[options.format]
    graph = model
    if options.deploy and options.fused_ops and options.format == "executorch":  # micronet::shift_max kernel calls
        graph = convert_to_deploy(model, backend="portable", fused_ops=True, **target.options)
    elif options.deploy and options.fused_ops:  # micronet.ShiftMax nodes: ONNX's deploy graph (OpenVINO reads it)
        graph = convert_to_deploy(model, backend="onnx", fused_ops=True)
    elif options.deploy:
        graph = convert_to_deploy(model, backend=target.backend, **target.options)
    kwargs: dict[str, Any] = dict(opset=options.opset, exporter=options.exporter, simplify=options.simplify)
    if target.fixed_shape:
        kwargs = dict(metadata=metadata, dynamic_batch=options.dynamic_batch, fused_ops=options.fused_ops)
    try:
        return target.export(graph, Path(path), input_shape, **kwargs)
    except ImportError as err:
        raise ExportError(str(err)) from err


def export_and_check(
    loaded: LoadedModel, output: str | os.PathLike, options: ExportOptions, log: Callable[[str], None] = print
) -> bool:
    """``micronet export``: write ``output``, print what was written and its parity; False when a check fails."""
    options.validate()
    library = None
    if options.fused_ops:
        try:
            libraries = {"openvino": openvino_ops.library_path, "executorch": executorch_ops.library_path}
            library = libraries.get(options.format, library_path)()
        except FusedOpsUnavailable as err:
            raise ExportError(str(err)) from err
    model, cfg = loaded.model.eval(), loaded.data_config
    in_chans = getattr(model, "in_chans", cfg.in_chans)
    shape = (1, in_chans, cfg.img_size, cfg.img_size)
    out = Path(output)
    t0 = time.perf_counter()
    written = out.with_name(out.stem + "-fp32.onnx") if options.int8 else out
    meta = export_metadata(loaded)
    res = export_model(model, written, shape, options, meta)
    write_metadata(res, meta)
    log(
        f"exported {loaded.name} ({'deploy mode' if options.deploy else 'eager'}) to {res.path} "
        f"[{res.format}, {res.exporter}, {time.perf_counter() - t0:.1f} s]"
        + (f", {res.nodes} ONNX nodes" if res.nodes else "")
    )
    for note in res.notes:
        log(f"  note: {note}")
    for failure in res.failures:
        log(f"  FAIL: {failure}")
    if library is not None and options.format == "executorch":
        log(
            f"  note: calls the micronet::shift_max kernel; load it before the program: "
            f"ctypes.CDLL('{library}', mode=ctypes.RTLD_GLOBAL)"
        )
    elif library is not None and options.format == "openvino":
        log(f"  note: uses the micronet.ShiftMax operation; an openvino.Core needs core.add_extension('{library}')")
    elif library is not None:
        log(
            f"  note: uses the micronet.ShiftMax operator; ONNX Runtime sessions need "
            f"SessionOptions.register_custom_ops_library('{library}') (micronet_torch.fused_ops.register)"
        )
    check_x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(0))
    check_fp32(res, model, check_x)
    ok = res.rel_diff <= FP32_TOLERANCE and not res.failures
    fixed = TARGETS[options.format].fixed_shape and not options.dynamic_batch
    how = "batch 3, image by image: fixed input shape" if fixed else "batch 3"
    log(
        f"parity vs PyTorch (fp32, {how}): max|diff| = {res.max_abs_diff:.3g} = {res.rel_diff:.2e} x max|logits| "
        f"(limit {FP32_TOLERANCE:g}) {'OK' if res.rel_diff <= FP32_TOLERANCE else 'FAIL'}"
    )
    if not ok or not options.int8:
        return ok
    skipped: dict[str, str] = {}
    skip = options.skip_bad_images
    calib_x, what = calibration_images(options.calib, cfg, options.calib_count, "train", skip, skipped)
    check_x, check_what = calibration_images(options.calib, cfg, None, "val", skip, skipped)
    for path, err in sorted(skipped.items()):
        log(f"  skipped unreadable calibration image {path}: {err}")
    if options.calib != "fashion-mnist":
        check_what = what + " (the calibration images)"
    # quantized under a name that says it is unchecked; renamed to OUTPUT only once its check passes
    pending = out.with_name(out.stem + ".unchecked" + out.suffix)
    try:
        quantize_onnx(
            res.path, pending, calib_x, options.int8_format, per_channel=options.per_channel,
            float_convs=options.float_convs,
        )  # fmt: skip
        write_onnx_metadata(pending, {**meta, "quantization": f"int8 {options.int8_format}"})
        q = check_int8(
            ExportResult(pending, "onnx", exporter=f"ORT quantize_static {options.int8_format}"), model, check_x
        )
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    ok = q.agreement >= INT8_MIN_AGREEMENT
    scales = "per-channel" if options.per_channel else "per-tensor"
    if options.float_convs:
        scales += f", first {options.float_convs} convs and the head linears in float"
    if ok:
        os.replace(pending, out)
        kept = str(out)
    elif options.keep_failed:
        kept = str(out.with_name(out.stem + "-FAILED" + out.suffix))
        os.replace(pending, kept)
    else:
        pending.unlink(missing_ok=True)
        kept = f"not written (its check failed; --keep-failed keeps it as {out.stem}-FAILED{out.suffix})"
    log(f"int8 ({options.int8_format}, {scales}) calibrated on {what}: {kept}")
    log(
        f"top-1 agreement int8 vs fp32 PyTorch on {check_what}: {q.agreement * 100:.2f} % "
        f"(limit {INT8_MIN_AGREEMENT * 100:.0f} %) {'OK' if ok else 'FAIL'}"
    )
    return ok


def write_metadata(res: ExportResult, meta: dict[str, str]) -> None:
    """Put ``export_metadata`` into the written file: ONNX ``metadata_props``; TorchScript and torch.export
    programs get it as the extra file ``metadata.json``."""
    if res.format == "onnx":  # a dynamic batch axis
        write_onnx_metadata(res.path, {**meta, "input_size": json.dumps(["batch", *json.loads(meta["input_size"])])})
    elif res.format == "torchscript":
        mod = torch.jit.load(str(res.path))
        torch.jit.save(mod, str(res.path), _extra_files={"metadata.json": json.dumps(meta)})
    elif res.format == "exported-program":
        prog = torch.export.load(str(res.path))
        torch.export.save(prog, str(res.path), extra_files={"metadata.json": json.dumps(meta)})
