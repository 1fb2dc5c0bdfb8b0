"""Export a model (deploy mode by default) to a target of ``targets.TARGETS``, check it, and optionally quantize.

``export_model`` is the one pipeline from an eval-mode model to a written file (deploy conversion for the
target's backend, export); ``export_and_check`` adds what ``micronet export`` promises: fp32 parity with
PyTorch on a batch of 3 (also checks the dynamic batch axis; a fixed-shape file runs it image by image) and,
for int8, top-1 agreement on real images. The file carries ``metadata.export_metadata`` where its format can.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.config import MAX_IMG_SIZE
from ..deploy import convert_to_deploy
from ..kernels.ort_ops import FusedOpsUnavailable
from ..models import LoadedModel, MicroNet
from .calibration import calibration_images
from .files import check_outputs, commit, staging, write_failure
from .metadata import export_metadata, write_onnx_metadata
from .onnx import DEFAULT_OPSET, check_opset
from .ort import INT8_FORMATS, quantize_onnx
from .parity import FP32_TOLERANCE, INT8_MIN_AGREEMENT, check_fp32, check_int8
from .result import ExportError, ExportResult
from .targets import TARGETS, Target


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

    overwrite: bool = False  # replace files that this format's export did not write
    # set by export_checked for a target that quantizes itself: (calibration images, what, check images, what)
    calibration: tuple | None = None

    def validate(self) -> None:
        """Refuse combinations that cannot work, naming the flags; a missing runtime names its pip extra.

        ``--int8`` on a format whose row names an ``int8_target`` selects that target (``--format tflite --int8``:
        ``tflm``); a target that ``quantizes`` is int8 by construction and needs ``--calib``."""
        if self.format not in TARGETS:
            raise ExportError(f"--format {self.format}: choose one of {', '.join(TARGETS)}")
        if self.int8 and TARGETS[self.format].int8_target:
            self.format = TARGETS[self.format].int8_target
        target = TARGETS[self.format]
        missing = target.missing()
        if missing:
            raise ExportError(missing)
        if target.quantizes:
            self.int8 = False  # implied: the int8 here is the target's own, not ONNX Runtime's
            if not self.calib:
                raise ExportError(
                    f"--format {self.format} writes a fully int8 file: it needs --calib DIR (an image folder, or "
                    "fashion-mnist)"
                )

        def takers(flag: str) -> str:
            return " or ".join(f"--format {t.name}" for t in TARGETS.values() if flag in t.flags)

        if "opset" in target.flags:
            check_opset(self.opset)
        if self.dynamic_batch and "dynamic_batch" not in target.flags:
            raise ExportError(
                f"--dynamic-batch is for {takers('dynamic_batch')} (ONNX always has a dynamic batch axis)"
            )
        if self.int8 and "int8" not in target.flags:
            raise ExportError(f"--int8 needs {takers('int8')} (quantization runs in ONNX Runtime)")
        if self.int8 and not self.calib:
            raise ExportError("--int8 needs --calib DIR (an image folder, or fashion-mnist)")
        if self.int8_format not in INT8_FORMATS:
            raise ExportError(f"--int8-format {self.int8_format}: choose one of {', '.join(INT8_FORMATS)}")
        if self.fused_ops:
            clash = [
                flag
                for flag, on in (
                    ("--format " + self.format, target.fused is None),
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


def deploy_graph(model: nn.Module, target: Target, options: ExportOptions) -> nn.Module:
    """The graph the target's converter gets: the deploy form for its backend (the fused-operator form with
    ``--fused-ops``), or ``model`` itself with ``deploy`` off."""
    if not options.deploy or not isinstance(model, MicroNet):  # the baselines have no deploy form
        return model
    if options.fused_ops and target.fused is not None:
        return convert_to_deploy(model, backend=target.fused.backend, fused_ops=True, **target.fused.options)
    return convert_to_deploy(model, backend=target.backend, **target.options)


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
    try:
        return target.export(deploy_graph(model, target, options), Path(path), input_shape, options, metadata)
    except ImportError as err:
        raise ExportError(str(err)) from err


@dataclass
class ExportReport:
    """What ``export_checked`` did: whether every check passed, the lines ``micronet export`` prints, the files
    written (final paths) and the export's ``ExportResult``."""

    ok: bool = False
    lines: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    result: ExportResult | None = None


def export_checked(loaded: LoadedModel, output: str | os.PathLike, options: ExportOptions) -> ExportReport:
    """``micronet export``: write ``output`` (and the files beside it) as one transaction and check its parity.

    Everything that can be refused is refused before the work: the options, the output's names and folder, files
    another format wrote, the calibration images. The files are written to a staging folder, their metadata put
    in, parity checked, then renamed into place (``runtime/files.py``); a write error is one ``ExportError``.
    """
    options.validate()
    target = TARGETS[options.format]
    library = None
    if options.fused_ops and target.fused is not None:
        try:
            library = target.fused.library()
        except FusedOpsUnavailable as err:
            raise ExportError(str(err)) from err
    model, cfg = loaded.model.eval(), loaded.data_config
    if not 1 <= cfg.img_size <= MAX_IMG_SIZE:
        raise ExportError(f"--img-size {cfg.img_size}: the input size must be 1 to {MAX_IMG_SIZE} px")
    in_chans = getattr(model, "in_chans", cfg.in_chans)
    shape = (1, in_chans, cfg.img_size, cfg.img_size)
    out = target.main_file(output)
    failed = out.with_name(out.stem + "-FAILED" + out.suffix)
    check_outputs(target, [out, failed] if options.int8 and options.keep_failed else [out], options.overwrite)
    report = ExportReport()
    calib = None
    if options.int8 or target.quantizes:  # read before the minute of fp32 export
        calib = _calibration(options, cfg, report)
        if target.quantizes:
            options = dataclasses.replace(options, calibration=calib)
    meta = {**export_metadata(loaded), "export_format": target.name}
    t0 = time.perf_counter()
    with staging(out.parent) as stage:
        try:
            res = _export_and_check_staged(model, target, stage, out, shape, options, meta, calib, report)
        except ExportError:
            raise
        except Exception as err:
            reason = write_failure(err)
            if reason is None:
                raise
            raise ExportError(
                f"cannot write {out} ({reason}); nothing was written, files already there are kept"
            ) from err
        if res is not None:
            moves = [(stage / p.name, p) for p in report.files if (stage / p.name).exists()]
            commit(moves)
            res.path = report.files[-1]
    if res is not None and not options.int8:
        report.lines.insert(
            0,
            f"exported {loaded.name} ({'deploy mode' if options.deploy else 'eager'}) to {out} "
            f"[{res.format}, {res.exporter}, {time.perf_counter() - t0:.1f} s]"
            + (f", {res.nodes} ONNX nodes" if res.nodes else ""),
        )
    if library is not None and target.fused is not None:
        report.lines.append("  note: " + target.fused.usage.format(library=library))
    return report


def _calibration(options: ExportOptions, cfg, report: ExportReport) -> tuple:
    """The int8 calibration and check images, read (and every one checked) before any export work."""
    skipped: dict[str, str] = {}
    skip = options.skip_bad_images
    calib_x, what = calibration_images(options.calib, cfg, options.calib_count, "train", skip, skipped)
    check_x, check_what = calibration_images(options.calib, cfg, None, "val", skip, skipped)
    for path, err in sorted(skipped.items()):
        report.lines.append(f"  skipped unreadable calibration image {path}: {err}")
    if options.calib != "fashion-mnist":
        check_what = what + " (the calibration images)"
    return calib_x, what, check_x, check_what


def _export_and_check_staged(
    model: nn.Module,
    target: Target,
    stage: Path,
    out: Path,
    shape: tuple[int, ...],
    options: ExportOptions,
    meta: dict[str, str],
    calib: tuple | None,
    report: ExportReport,
) -> ExportResult | None:
    """Export into ``stage`` and check; sets ``report.files`` to the final paths to commit (none: nothing to keep)."""
    t0 = time.perf_counter()
    res = export_model(model, stage / ("fp32.onnx" if options.int8 else out.name), shape, options, meta)
    if target.write_metadata is not None:
        target.write_metadata(res.path, meta)
    lines = report.lines
    if options.int8:
        lines.append(f"exported the fp32 graph to quantize [{res.exporter}, {time.perf_counter() - t0:.1f} s]")
    lines += [f"  note: {note}" for note in res.notes] + [f"  FAIL: {failure}" for failure in res.failures]
    if target.quantizes:  # an int8 file its converter checked against the float model: no fp32 parity
        lines += res.checks
        report.ok, report.result, report.files = not res.failures, res, target.files(out)
        return res
    check_x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(0))
    check_fp32(res, model, check_x)
    report.ok = res.rel_diff <= FP32_TOLERANCE and not res.failures
    fixed = target.fixed_shape and not options.dynamic_batch
    how = "batch 3, image by image: fixed input shape" if fixed else "batch 3"
    lines.append(
        f"parity vs PyTorch (fp32, {how}): max|diff| = {res.max_abs_diff:.3g} = {res.rel_diff:.2e} x max|logits| "
        f"(limit {FP32_TOLERANCE:g}) {'OK' if res.rel_diff <= FP32_TOLERANCE else 'FAIL'}"
    )
    if not options.int8:
        report.result = res
        report.files = target.files(out)
        return res
    if not report.ok:
        lines.append("int8: not written (the fp32 graph failed its check)")
        return None
    assert calib is not None
    calib_x, what, check_x, check_what = calib
    staged = stage / out.name
    quantize_onnx(
        res.path, staged, calib_x, options.int8_format, per_channel=options.per_channel,
        float_convs=options.float_convs,
    )  # fmt: skip
    write_onnx_metadata(staged, {**meta, "quantization": f"int8 {options.int8_format}"})
    q = check_int8(ExportResult(staged, "onnx", exporter=f"ORT quantize_static {options.int8_format}"), model, check_x)
    report.ok = q.agreement >= INT8_MIN_AGREEMENT
    report.result = q
    scales = "per-channel" if options.per_channel else "per-tensor"
    if options.float_convs:
        scales += f", first {options.float_convs} convs and the head linears in float"
    failed = out.with_name(out.stem + "-FAILED" + out.suffix)
    if report.ok:
        report.files, kept = [out], str(out)
    elif options.keep_failed:
        staged.rename(stage / failed.name)
        report.files, kept = [failed], str(failed)
    else:
        kept = f"not written (its check failed; --keep-failed keeps it as {failed.name})"
    lines.append(f"int8 ({options.int8_format}, {scales}) calibrated on {what}: {kept}")
    lines.append(
        f"top-1 agreement int8 vs fp32 PyTorch on {check_what}: {q.agreement * 100:.2f} % "
        f"(limit {INT8_MIN_AGREEMENT * 100:.0f} %) {'OK' if report.ok else 'FAIL'}"
    )
    return q if report.files else None


def export_and_check(
    loaded: LoadedModel, output: str | os.PathLike, options: ExportOptions, log: Callable[[str], None] = print
) -> bool:
    """``export_checked`` with its lines passed to ``log``; False when a check fails."""
    report = export_checked(loaded, output, options)
    for line in report.lines:
        log(line)
    return report.ok


def write_metadata(res: ExportResult, meta: dict[str, str]) -> None:
    """Put ``export_metadata`` into a written file the way its target does (nothing for targets whose converter
    wrote it already)."""
    writer = TARGETS[res.format].write_metadata
    if writer is not None:
        writer(res.path, meta)
