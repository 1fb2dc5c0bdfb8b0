"""``micronet bench-train``: training images/s and peak memory of Dynamic Shift-Max's implementations.

Times forward + backward + SGD step (random data, cross-entropy) of MicroNet models with every
DynamicShiftMax run eagerly, through the fused kernels, through ``torch.compile`` of the eager fusion, and
with every DynamicShiftMax replaced by ReLU (the floor a perfect Dynamic Shift-Max could reach). Variants are
interleaved step by step, so a shared or throttled machine slows them alike and the ratios stay comparable.
Peak memory is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over one step above the resident set before it: torch's CPU allocations are plain malloc/mmap, which
tracemalloc does not see. For that phase (after the timings, so they are unaffected) glibc is told to
serve every block over 64 KiB by mmap and to give freed memory back (mallopt, malloc_trim), so the resident
set follows the live tensors.

    micronet bench-train --models micronet_m0 micronet_m3 mobilenetv3_small_100 --settings 224x32 32x128 \
        --threads 1 2 --out-dir bench-train/

Models without a Dynamic Shift-Max (the MobileNetV3 baselines) run once, as ``eager``.
"""

from __future__ import annotations

import copy
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .._env import cpu_name
from ..models import build_model
from ..ops import DynamicShiftMax, set_shift_max_impl
from .bench_report import TRAIN_VARIANTS, save_report
from .bench_standins import ReLUFloor as ReLUFloor  # its old home
from .bench_standins import replace_shift_max

VARIANTS = TRAIN_VARIANTS


def make_variant(base: nn.Module, variant: str) -> nn.Module:
    """A copy of ``base`` (same weights) set up as ``variant``."""
    model = copy.deepcopy(base).train()
    if variant == "relu":
        replace_shift_max(model)
    else:
        set_shift_max_impl(model, variant)
    return model


class Stepper:
    """One model with its optimizer and a fixed random batch."""

    def __init__(self, model: nn.Module, batch: int, size: int, classes: int) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen)
        self.y = torch.randint(0, classes, (batch,), generator=gen)

    def step(self) -> float:
        """Seconds of one training step."""
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _libc_release() -> None:
    """Make glibc map big blocks with mmap and return freed memory (no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so no longer raised as blocks are freed
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_step_mib(stepper: Stepper) -> float | None:
    """Rise of peak RSS during one step over RSS before it, in MiB (None where /proc cannot reset it)."""
    _libc_release()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS:")
    stepper.step()
    return (_status_kib("VmHWM:") - before) / 1024


def run(
    models: list[str],
    settings: list[tuple[int, int]],
    variants: list[str],
    steps: int,
    warmup: int,
    threads: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Interleaved timings of every (model, setting, variant) at ``threads`` CPU threads; one dict per row."""
    torch.set_num_threads(threads)
    rows = []
    for name in models:
        base = build_model(name)
        classes = getattr(base, "num_classes", 1000)
        has_dsm = any(isinstance(m, DynamicShiftMax) for m in base.modules())
        wanted = variants if has_dsm else [v for v in variants if v == "eager"] or ["eager"]
        for size, batch in settings:
            if log:
                log(f"  {name} {size}x{size} batch {batch}, {threads} thread(s): {', '.join(wanted)}")
            steppers = {v: Stepper(make_variant(base, v), batch, size, classes) for v in wanted}
            first = {v: s.step() for v, s in steppers.items()}  # compile happens here
            for _ in range(warmup):
                for s in steppers.values():
                    s.step()
            times: dict[str, list[float]] = {v: [] for v in wanted}
            for _ in range(steps):
                for v, s in steppers.items():
                    times[v].append(s.step())
            peaks = {v: peak_step_mib(s) for v, s in steppers.items()}
            med = {v: statistics.median(t) for v, t in times.items()}
            for v in wanted:
                rows.append(
                    {
                        "model": name,
                        "threads": threads,
                        "size": size,
                        "batch": batch,
                        "variant": v,
                        "step_ms": med[v] * 1e3,
                        "images_per_s": batch / med[v],
                        "first_step_s": first[v],
                        "peak_step_mib": peaks[v],
                        "speed_vs_eager": med["eager"] / med[v] if "eager" in med else None,
                        "time_vs_relu": med[v] / med["relu"] if "relu" in med else None,
                    }
                )
            del steppers
    return rows


def environment(steps: int, warmup: int) -> dict:
    """The line above every table: CPU, cores, load, versions and the timing settings."""
    return dict(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        loadavg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        torch=torch.__version__,
        steps=steps,
        warmup=warmup,
    )


def markdown(rows: list[dict], env: dict | None = None) -> str:
    """The rows as a Markdown table (per thread count), under the environment line."""
    lines = []
    if env:
        lines += [
            f"CPU: {env['cpu']} ({env['cores']} cores), load at start {env['loadavg']} | torch {env['torch']} | "
            f"median of {env['steps']} interleaved steps after {env['warmup']} warm-up; forward + backward + SGD "
            "step, random data; peak MiB: resident-set rise over one step",
            "",
        ]
    head = "| model | threads | setting | variant | step ms | img/s | × eager | time / ReLU | first step s | peak MiB |"
    lines += [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['speed_vs_eager']:.2f}" if r["speed_vs_eager"] else "–"
        floor = f"{r['time_vs_relu']:.2f}" if r["time_vs_relu"] else "–"
        peak = f"{r['peak_step_mib']:.0f}" if r["peak_step_mib"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['size']}², batch {r['batch']} | {r['variant']} | "
            f"{r['step_ms']:.1f} | {r['images_per_s']:.1f} | {ratio} | {floor} | {r['first_step_s']:.2f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def save(rows: list[dict], env: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``bench_train.json`` and ``bench_train.md`` in ``out_dir`` (written atomically)."""
    return save_report(out_dir, "bench_train", dict(environment=env, rows=rows), markdown(rows, env))
