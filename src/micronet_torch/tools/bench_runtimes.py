"""``micronet bench --runtimes``: MicroNet against MobileNetV3-Small / LCNet in each deployment runtime.

Every model is exported to each runtime the way ``micronet export --format`` does (MicroNet through the
target's deploy backend and options, the timm baselines as they are), loaded with one thread, checked against
the eager model on one image, then timed with ``bench.time_round_robin`` in turns with the other models of
the same runtime (1 thread, batch 1): ratios within a runtime stay meaningful on a shared machine. One table
per runtime, and ratio lines: M0 / ``mobilenetv3_small_050`` and M3 / ``mobilenetv3_small_100``, with the
floors beside them when they were timed (and, with ``show_targets``, the project's internal latency targets).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deploy import convert_to_deploy
from ..models import is_micronet
from ..runtime import TARGETS, ExportOptions, export_model
from .bench import DEFAULT_MODELS, bench_model, environment, time_round_robin, trained_like
from .bench_floors import FLOORS, floor_graph
from .bench_report import ALL_RUNTIMES, FUSED_RUNTIMES, RUNTIMES, save_report

# (MicroNet, its MobileNetV3-Small reference, the project's internal latency target for that ratio)
RATIO_TARGETS = (("micronet_m0", "mobilenetv3_small_050", 0.85), ("micronet_m3", "mobilenetv3_small_100", 1.0))
# with a runtime's own fused operator M0 should reach what micronet.ShiftMax reached in ONNX Runtime
FUSED_RATIO_TARGETS = {"micronet_m0": 0.75}


@dataclass
class RuntimeRecord:
    """One model in one runtime: 1 thread, batch 1 latency, and its parity with the eager model."""

    runtime: str
    model: str
    median_ms: float | None
    mean_ms: float | None
    min_ms: float | None
    runs: int
    parity: float | None  # max|runtime - eager| / max|eager logits| on one image
    export_s: float
    error: str = ""  # why the model did not export or run in this runtime


def parse_runtimes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``ort,openvino`` (or a list of such) -> ('ort', 'openvino'), refusing unknown names."""
    items = [text] if isinstance(text, str) else list(text)
    names = tuple(n.strip() for item in items for n in item.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_RUNTIMES]
    if unknown:
        raise ValueError(f"--runtimes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_RUNTIMES)}")
    return names


def _prepare(
    runtime: str, name: str, eager: torch.nn.Module, x: torch.Tensor, workdir: Path, floor: str = ""
) -> tuple[Callable[[], Any] | None, RuntimeRecord]:
    """Export ``name`` to ``runtime`` (or its ``floor`` variant, ``bench_floors``), load it with one thread and
    check it against the eager model (floors compute something else: no parity); the job to time (None on
    error)."""
    fmt = ALL_RUNTIMES[runtime]
    t0 = time.perf_counter()
    rec = RuntimeRecord(runtime, f"{name}+{floor}" if floor else name, None, None, None, 0, None, 0.0)
    try:
        model, deploy = eager, is_micronet(name)  # timm models have no deploy form
        if floor:
            graph = convert_to_deploy(eager, backend=TARGETS[fmt].backend, **TARGETS[fmt].options)
            model, deploy = floor_graph(graph, floor), False
        options = ExportOptions(format=fmt, deploy=deploy, fused_ops=deploy and runtime in FUSED_RUNTIMES)
        res = export_model(model, workdir / f"{rec.model}-{runtime}{TARGETS[fmt].suffix}", tuple(x.shape), options, {})
        run = TARGETS[fmt].load(res.path, 1)
        if not floor:
            with torch.no_grad():
                ref = eager(x).numpy()
            rec.parity = float(np.abs(run(x) - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        else:
            run(x)
    except Exception as err:  # a runtime that cannot take a model is a result of the benchmark, not a crash
        rec.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        rec.export_s = round(time.perf_counter() - t0, 1)
        return None, rec
    rec.export_s = round(time.perf_counter() - t0, 1)
    return (lambda: run(x)), rec


def run_runtime_benchmark(
    models: tuple[str, ...] = DEFAULT_MODELS,
    runtimes: tuple[str, ...] = tuple(RUNTIMES),
    runs: int = 100,
    warmup: int = 10,
    img_size: int = 224,
    log: Callable[[str], None] = print,
    out_dir: str | os.PathLike | None = None,
    max_seconds: float | None = 120.0,
    block: int = 5,
    floors: bool = False,
) -> tuple[list[RuntimeRecord], dict[str, Any]]:
    """Time every model in every runtime (1 thread, batch 1); a runtime whose package is missing is skipped
    with a line naming its pip extra. With ``floors`` each MicroNet also gets its ``+relu`` and ``+noshift``
    rows (``bench_floors``), timed in the same turns. Results are saved after each runtime when ``out_dir`` is
    given."""
    runtimes = parse_runtimes(runtimes)
    env = environment()
    env.update(runs=runs, warmup=warmup, img_size=img_size, max_seconds=max_seconds, block=block, threads=1)
    env["floors"] = list(FLOORS) if floors else []
    env["models"] = list(models)
    env["runtime_versions"] = _versions(runtimes)
    records: list[RuntimeRecord] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    eagers = {name: trained_like(bench_model(name)) for name in models}
    try:
        for runtime in runtimes:
            missing = TARGETS[ALL_RUNTIMES[runtime]].missing()
            if missing:
                log(f"  {runtime}: skipped: {missing}")
                env.setdefault("skipped", {})[runtime] = missing
                continue
            with tempfile.TemporaryDirectory() as tmp:
                jobs: dict[tuple[str, str], Callable[[], Any]] = {}
                recs: dict[str, RuntimeRecord] = {}
                floors_here = () if runtime in FUSED_RUNTIMES else env["floors"]  # floors: standard-op graphs
                variants = [(n, f) for n in eagers for f in ("", *floors_here) if not f or is_micronet(n)]
                for name, floor in variants:
                    job, rec = _prepare(runtime, name, eagers[name], x, Path(tmp), floor)
                    recs[rec.model] = rec
                    if job is not None:
                        jobs[(rec.model, runtime)] = job
                    checked = "a floor, no parity" if floor else f"parity {rec.parity:.2e}"
                    log(f"  {runtime} {rec.model}: " + (rec.error or f"exported in {rec.export_s} s, {checked}"))
                t0 = time.perf_counter()
                times = time_round_robin(jobs, runs, warmup, max_seconds, block) if jobs else {}
                log(f"  {runtime}: {len(jobs)} models timed in {time.perf_counter() - t0:.0f} s")
                for (name, _), ts in times.items():
                    rec = recs[name]
                    rec.median_ms, rec.mean_ms = (
                        round(statistics.median(ts) * 1e3, 4),
                        round(statistics.fmean(ts) * 1e3, 4),
                    )
                    rec.min_ms, rec.runs = round(min(ts) * 1e3, 4), len(ts)
                records += recs.values()
                del jobs, times
            if out_dir:  # partial results survive an interrupted run
                save_runtimes(records, env, out_dir)
    finally:
        torch.set_num_threads(threads)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return records, env


def _versions(runtimes: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each runtime's Python packages."""
    dists = {
        "ort": ("onnxruntime",),
        "openvino": ("openvino",),
        "executorch": ("executorch",),
        "tflite": ("litert-torch", "ai-edge-litert"),
        "ncnn": ("pnnx", "ncnn"),
        "ort-ops": ("onnxruntime",),
        "openvino-ops": ("openvino",),
        "executorch-ops": ("executorch",),
    }
    out = {}
    for rt in runtimes:
        for dist in dists[rt]:
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "missing"
    return out


def _find(records: list[RuntimeRecord], runtime: str, model: str) -> RuntimeRecord | None:
    return next((r for r in records if r.runtime == runtime and r.model == model and r.median_ms), None)


def ratio_lines(records: list[RuntimeRecord], show_targets: bool = False) -> list[str]:
    """Per runtime: M0 / mobilenetv3_small_050 and M3 / mobilenetv3_small_100, and where the floors were timed,
    theirs. ``show_targets`` adds the project's internal targets and whether a cheaper Dynamic Shift-Max could
    meet them at all (for its docs, not users: off in the printed tables)."""
    out = []
    for runtime in dict.fromkeys(r.runtime for r in records):
        for micronet, ref, limit in RATIO_TARGETS:
            if runtime in FUSED_RUNTIMES:
                limit = FUSED_RATIO_TARGETS.get(micronet, limit)
            a, b = _find(records, runtime, micronet), _find(records, runtime, ref)
            if not (a and b):
                continue
            ratio = a.median_ms / b.median_ms
            line = f"{runtime}: {micronet} / {ref} = {a.median_ms:.3f} / {b.median_ms:.3f} ms = {ratio:.2f}x"
            if show_targets:
                line += f" (target <= {limit:.2f}x: {'met' if ratio <= limit else 'NOT met'})"
            # a noisy machine moves the medians; the fastest runs say how much (timed together: both set)
            line += f", fastest runs {a.min_ms:.3f} / {b.min_ms:.3f} ms = {a.min_ms / b.min_ms:.2f}x"
            relu, noshift = (_find(records, runtime, f"{micronet}+{f}") for f in FLOORS)
            if relu and noshift:
                r, n = relu.median_ms / b.median_ms, noshift.median_ms / b.median_ms
                line += f"; DSM -> ReLU {r:.2f}x, DSM without its shift {n:.2f}x"
                if show_targets and r > limit:
                    line += ": out of reach of any Dynamic Shift-Max (the rest of the network alone is slower)"
                elif show_targets and n > limit and ratio > limit:
                    line += ": out of reach of standard operators (only a fused runtime operator could)"
            out.append(line)
    return out


def markdown_runtimes(records: list[RuntimeRecord], env: dict[str, Any]) -> str:
    """One table per runtime (median and fastest ms, ratio of medians to MobileNetV3-Small 0.5, parity), then the
    ratio lines."""
    versions = ", ".join(f"{k} {v}" for k, v in env.get("runtime_versions", {}).items())
    lines = [
        f"CPU: {env.get('cpu')} ({env.get('cores')} cores) | torch {env.get('torch')} | {versions}",
        "",
        f"1 thread, batch 1, {env.get('img_size')}² input; median of up to {env.get('runs')} runs per model, timed "
        f"in turns of {env.get('block')} calls (the first untimed) with the other models of the same runtime, "
        f"each runtime capped at {env.get('max_seconds')} s; weights random with trained-like BatchNorm; load "
        f"average at start {env.get('loadavg')}, at end {env.get('loadavg_end')}.",
    ]
    for runtime in dict.fromkeys(r.runtime for r in records):
        rows = [r for r in records if r.runtime == runtime]
        ref = _find(records, runtime, "mobilenetv3_small_050")
        lines += ["", f"**{runtime}** (ms)", "", "| model | median | fastest | / mobilenetv3_small_050 | parity |"]
        lines.append("|---|---:|---:|---:|---:|")
        for r in rows:
            if r.median_ms is None:
                lines.append(f"| {r.model} | – | – | – | {r.error or '–'} |")
                continue
            rel = f"{r.median_ms / ref.median_ms:.2f}x" if ref else "–"
            parity = "floor" if r.parity is None else f"{r.parity:.1e}"
            lines.append(f"| {r.model} | {r.median_ms:.3f} | {r.min_ms:.3f} | {rel} | {parity} |")
    for runtime, why in env.get("skipped", {}).items():
        lines += ["", f"**{runtime}**: skipped ({why})"]
    ratios = ratio_lines(records)
    if ratios:
        lines += ["", "**Ratios (1 thread, batch 1)**", ""] + [f"- {t}" for t in ratios]
    return "\n".join(lines) + "\n"


def save_runtimes(records: list[RuntimeRecord], env: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``bench-runtimes.json`` (environment + records) and ``bench-runtimes.md`` in ``out_dir``."""
    payload = dict(environment=env, records=[asdict(r) for r in records])
    return save_report(out_dir, "bench-runtimes", payload, markdown_runtimes(records, env))
