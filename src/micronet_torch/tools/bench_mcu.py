"""``micronet bench --mcu``: what each model costs on a microcontroller, from its fully int8 TFLM file.

Per model and input size: flash (the ``.tflite`` bytes), TFLM's arena (activations, i.e. the memory planner's
head, and the fixed tail: tensor and node records, quantization parameters), op and tensor count, latency in
TFLM's reference kernels on this host (one child process per input size, the models' single-image calls
interleaved round robin, so ratios hold on a shared CPU), and the int8 file's top-1 agreement with the float
model. Every model is exported as ``micronet export --format tflm`` does (``runtime.mcu``), with
``trained_like`` BatchNorm statistics and smooth synthetic calibration images unless images are given.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import build_model
from ..runtime import synthetic_images
from ..runtime.mcu import export_mcu, quantize_pixels
from ..runtime.tflm import run_tflm
from .bench import DEFAULT_MODELS as DEFAULT_BENCH_MODELS
from .bench import environment, trained_like
from .bench_report import MCU_SIZES, environment_line, save_report

MCU_MODELS = ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3", "mobilenetv3_small_050")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class McuRecord:
    """One model at one input size in TFLM."""

    model: str
    img_size: int
    num_classes: int
    flash_bytes: int
    arena_bytes: int
    arena_activations: int
    arena_fixed: int
    ops: int
    tensors: int
    latency_ms: float
    top1_agreement: float
    step_agreement: float


def synthetic_pixels(n: int, img_size: int, seed: int = 0) -> np.ndarray:
    """Smooth random camera pixels (N, H, W, 3) in 0..255: ``synthetic_images`` mapped through the normalization."""
    x = synthetic_images(n, 3, img_size, seed)
    p = (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
    return p.clamp(0, 255).round().permute(0, 2, 3, 1).numpy().astype(np.float32)


def run_mcu_benchmark(
    models: tuple[str, ...] = MCU_MODELS,
    sizes: tuple[int, ...] = MCU_SIZES,
    num_classes: int = 10,
    runs: int = 20,
    calib_count: int = 64,
    check_count: int = 64,
    log: Callable[[str], None] = print,
    keep_dir: str | os.PathLike | None = None,
    mcu_options: dict[str, Any] | None = None,
) -> tuple[list[McuRecord], dict[str, Any]]:
    """Export every model at every size and measure it in TFLM (see the module docstring); ``mcu_options`` are the
    MicroNets' ``mcu`` form options (e.g. ``coefficients="conv"``)."""
    env = environment()
    records: list[McuRecord] = []
    with tempfile.TemporaryDirectory(prefix="micronet-bench-mcu-") as tmp:
        folder = Path(keep_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            calib = synthetic_pixels(calib_count, size, seed=1)
            check = synthetic_pixels(check_count, size, seed=2)
            files = []
            for name in models:
                model = trained_like(build_model(name, num_classes=num_classes)).eval()
                path = folder / f"{name}-{size}.tflite"
                res = export_mcu(model, path, size, MEAN, STD, calib, check, **(mcu_options or {}))
                files.append(res)
                log(
                    f"{name} at {size}^2: {res.flash_bytes} B flash, arena {res.arena.get('total', 0)} B "
                    f"({res.arena.get('head', 0)} + {res.arena.get('tail', 0)} fixed), {sum(res.ops.values())} ops"
                )
            run = run_tflm([f.path for f in files], [quantize_pixels(check[:1])] * len(files), rounds=runs)
            for name, res, lat in zip(models, files, run.latency, strict=True):
                records.append(
                    McuRecord(
                        name,
                        size,
                        num_classes,
                        res.flash_bytes,
                        res.arena.get("total", 0),
                        res.arena.get("head", 0),
                        res.arena.get("tail", 0),
                        sum(res.ops.values()),
                        res.tensors,
                        statistics.median(lat) * 1e3,
                        res.top1_agreement or 0.0,
                        res.step_agreement or 0.0,
                    )
                )
    return records, env


def markdown_mcu(records: list[McuRecord], env: dict[str, Any]) -> str:
    """One table: a row per model and size; latency also as a ratio to the first model of the same size."""
    lines = [
        environment_line(env),
        "",
        "TFLM reference kernels, fully int8 (micronet export --format tflm), arena on this 64-bit host",
        "",
        "| model | size | flash (KB) | arena (KB) | activations (KB) | fixed (KB) | ops | tensors | latency (ms) "
        "| vs first | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first: dict[int, float] = {}
    for r in records:
        first.setdefault(r.img_size, r.latency_ms)
        lines.append(
            f"| {r.model} | {r.img_size} | {r.flash_bytes / 1000:.0f} | {r.arena_bytes / 1000:.0f} | "
            f"{r.arena_activations / 1000:.0f} | {r.arena_fixed / 1000:.0f} | {r.ops} | {r.tensors} | "
            f"{r.latency_ms:.2f} | {r.latency_ms / first[r.img_size]:.2f}x | {r.top1_agreement * 100:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def save_mcu(records: list[McuRecord], env: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``bench-mcu.json`` and ``bench-mcu.md`` in ``out_dir``."""
    payload = dict(environment=env, records=[asdict(r) for r in records])
    return save_report(out_dir, "bench-mcu", payload, markdown_mcu(records, env))


def run_bench_mcu(args: Any, log: Callable[[str], None], report: Callable[..., int]) -> int:
    """``micronet bench --mcu`` from its parsed flags; ``report`` is the bench command's common ending."""
    try:
        sizes = tuple(int(s) for s in str(args.mcu_sizes).split(",") if s.strip())
    except ValueError as err:
        raise ValueError(f"--mcu-sizes {args.mcu_sizes!r}: give sizes like 64,96,160") from err
    if not sizes or min(sizes) < 16 or args.mcu_classes < 1:
        raise ValueError("--mcu-sizes needs sizes of at least 16, --mcu-classes at least 1")
    models = tuple(args.models) if args.models != list(DEFAULT_BENCH_MODELS) else MCU_MODELS
    options = {
        "coefficients": getattr(args, "mcu_coefficients", "matmul"),
        "stem": getattr(args, "mcu_stem", "separable"),
        "merge": getattr(args, "mcu_merge", "all"),
    }
    records, env = run_mcu_benchmark(models, sizes, args.mcu_classes, min(args.runs, 50), log=log, mcu_options=options)
    payload = dict(environment=env, records=[asdict(r) for r in records])
    return report(args, log, lambda: save_mcu(records, env, args.out_dir), payload, markdown_mcu(records, env))
