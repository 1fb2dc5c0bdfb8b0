"""Training-step benchmark of Dynamic Shift-Max implementations: eager, fused, compile, and the ReLU floor.

Times forward + backward + SGD step (random data, cross-entropy) of MicroNet models with every
DynamicShiftMax run eagerly, through the fused kernels, through ``torch.compile`` of the eager fusion, and
with every DynamicShiftMax replaced by ReLU (the floor a perfect Dynamic Shift-Max could reach). Variants are
interleaved step by step, so a shared or throttled machine slows them alike and the ratios stay comparable.
Peak memory is the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
over one step above the resident set before it: torch's CPU allocations are plain malloc/mmap, which
tracemalloc does not see. For that phase (after the timings, so they are unaffected) glibc is told to
serve every block over 64 KiB by mmap and to give freed memory back (mallopt, malloc_trim), so the resident
set follows the live tensors.

    PYTHONPATH=src python benchmarks/train_step_bench.py --models micronet_m0 micronet_m3 --settings 224x32 \
        --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import micronet_torch
from micronet_torch.ops import DynamicShiftMax, set_shift_max_impl

VARIANTS = ("eager", "fused", "compile", "relu")


class ReLUFloor(nn.Module):
    """ReLU as ``clamp_min``: its backward keeps the input, so the network may modify its output in place
    (as it may a Dynamic Shift-Max's output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)


def replace_shift_max(model: nn.Module) -> int:
    """Replace every DynamicShiftMax in ``model`` by ReLU, in place; returns how many were replaced."""
    count = 0
    for name, child in model.named_children():
        if isinstance(child, DynamicShiftMax):
            setattr(model, name, ReLUFloor())
            count += 1
        else:
            count += replace_shift_max(child)
    return count


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


def run(models: list[str], settings: list[tuple[int, int]], variants: list[str], steps: int, warmup: int) -> list[dict]:
    """Interleaved timings of every (model, setting, variant); one dict per row."""
    rows = []
    for name in models:
        base = micronet_torch.create_model(name)
        classes = base.num_classes if hasattr(base, "num_classes") else 1000
        for size, batch in settings:
            steppers = {v: Stepper(make_variant(base, v), batch, size, classes) for v in variants}
            first = {v: s.step() for v, s in steppers.items()}  # compile happens here
            for _ in range(warmup):
                for s in steppers.values():
                    s.step()
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(steps):
                for v, s in steppers.items():
                    times[v].append(s.step())
            peaks = {v: peak_step_mib(s) for v, s in steppers.items()}
            med = {v: statistics.median(t) for v, t in times.items()}
            for v in variants:
                rows.append(
                    {
                        "model": name,
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


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    head = "| model | setting | variant | step ms | img/s | × eager | time / ReLU | first step s | peak MiB |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['speed_vs_eager']:.2f}" if r["speed_vs_eager"] else "–"
        floor = f"{r['time_vs_relu']:.2f}" if r["time_vs_relu"] else "–"
        peak = f"{r['peak_step_mib']:.0f}" if r["peak_step_mib"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['size']}², batch {r['batch']} | {r['variant']} | {r['step_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {ratio} | {floor} | {r['first_step_s']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["micronet_m0", "micronet_m3"])
    p.add_argument("--settings", nargs="+", default=["224x32", "32x128"], help="SIZExBATCH")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [tuple(int(v) for v in s.split("x")) for s in args.settings]
    rows = run(args.models, settings, args.variants, args.steps, args.warmup)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
