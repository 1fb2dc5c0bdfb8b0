"""``micronet bench``: CPU latency and throughput of MicroNet and MobileNetV3 through every inference path.

Paths: ``eager`` (PyTorch eval mode), ``deploy`` (deploy-mode PyTorch), ``ort`` (ONNX Runtime fp32 of
the deploy graph), ``ort-int8`` (ONNX Runtime static int8), and ``ort-plain`` (ONNX Runtime fp32 of the
eager graph through the dynamo exporter + onnxslim, MicroNet only), and ``ort-legacy`` (ONNX Runtime fp32
of the eager graph through the legacy TorchScript exporter, unsimplified: the "plain export" of the issue
reports, the baseline of the M3 target), and ``ort-fused`` (ONNX Runtime fp32 of the deploy graph with every
Dynamic Shift-Max as one ``micronet.ShiftMax`` operator from the library in ``fused_ops.py``; MicroNet
only). All paths of one
setting (threads, batch) are timed round-robin, one call each in turn, so that a change in machine
load hits every path alike and ratios within a run stay meaningful on a shared CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PATHS = ("eager", "deploy", "ort", "ort-fused", "ort-int8", "ort-plain", "ort-legacy")
DEFAULT_PATHS = PATHS
MICRONETS = ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3")
TIMM_BASELINES = ("mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100", "lcnet_050")
DEFAULT_MODELS = MICRONETS + TIMM_BASELINES
REFERENCE = "mobilenetv3_small_050"


@dataclass
class Record:
    """One measurement: a model through one path at one (threads, batch) setting."""

    model: str
    path: str
    threads: int
    batch: int
    median_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    images_per_s: float
    onnx_nodes: int | None = None  # nodes in the file
    ort_nodes: int | None = None  # nodes after ONNX Runtime's own fusions


# ---- environment ------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """CPU, core count, load and library versions: the line printed above every table."""
    import onnxruntime
    import timm

    return dict(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        loadavg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        timm=timm.__version__,
    )


def environment_line(env: dict[str, Any]) -> str:
    load = env.get("loadavg")
    return (
        f"CPU: {env['cpu']} ({env['cores']} cores), load {load} | torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}, timm {env['timm']}, Python {env['python']}"
    )


# ---- models -----------------------------------------------------------------------------------------
def is_micronet(name: str) -> bool:
    from .registry import list_models

    return name.replace("-", "_").lower() in list_models()


def build_model(name: str) -> nn.Module:
    """A MicroNet or a timm model, random weights, eval mode."""
    if is_micronet(name):
        from .registry import create_model

        return create_model(name).eval()
    import timm

    try:
        return timm.create_model(name, pretrained=False).eval()
    except RuntimeError as err:
        raise ValueError(f"unknown model {name!r} (neither a MicroNet nor a timm model)") from err


def trained_like(model: nn.Module, seed: int = 0, img_size: int = 64) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics measured on random images.

    A trained network's BatchNorm shifts are never zero; with the default init (weight 1, bias 0, mean 0,
    var 1) they are, and the deploy graph's border corrections (``deploy.EdgeCorrectedConv``) vanish from
    the export: that would time a graph no real checkpoint produces (M0 in ONNX Runtime: 0.45 instead of
    0.47-0.53 ms). Every model of a run, MicroNet or not, gets the same treatment.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            if bn.affine:
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(2):
            model(torch.randn(8, getattr(model, "in_chans", 3), img_size, img_size, generator=g))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


def deploy_model(name: str, model: nn.Module, backend: str = "eager", fused_ops: bool = False) -> nn.Module:
    """MicroNet: ``convert_to_deploy``. timm: ``reparameterize_model`` (a no-op for these models: timm
    has no BatchNorm folding for MobileNetV3 / LCNet, so their deploy path equals eager)."""
    if is_micronet(name):
        from .deploy import convert_to_deploy

        return convert_to_deploy(model, backend=backend, fused_ops=fused_ops)
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model)


# ---- timing -------------------------------------------------------------------------------------------
def time_round_robin(
    jobs: dict[tuple[str, str], Callable[[], Any]],
    runs: int,
    warmup: int,
    max_seconds: float | None = None,
    block: int = 1,
) -> dict[tuple[str, str], list[float]]:
    """Seconds per call of each job, timed in turns after warm-up: ``runs`` timed calls per job.

    With ``block`` > 1 each turn is ``block`` consecutive calls of one job whose first call is not timed
    (it only refills the caches the other jobs evicted): the figures are the steady-state latency of a
    model called in a loop, as deployed, while every job still sees the same machine load.
    ``max_seconds`` caps the timed turns (at least 3 rounds run) and each job's warm-up (at least one
    call, then at most a quarter of the cap spread over the jobs): a loaded machine shortens the run
    instead of stalling it.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    warm_cap = None if max_seconds is None else max_seconds / 4 / max(1, len(jobs))
    for fn in jobs.values():
        t0 = time.perf_counter()
        for i in range(warmup):
            if warm_cap is not None and i >= 1 and time.perf_counter() - t0 > warm_cap:
                break
            fn()
    timed_per_turn = block - 1 if block > 1 else 1
    times: dict[tuple[str, str], list[float]] = {key: [] for key in jobs}
    start = time.perf_counter()
    rounds = 0
    while any(len(t) < runs for t in times.values()):
        if max_seconds is not None and rounds >= 3 and time.perf_counter() - start > max_seconds:
            break
        for key, fn in jobs.items():
            if block > 1:
                fn()  # refill the caches; not timed
            for _ in range(min(timed_per_turn, runs - len(times[key]))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        rounds += 1
    return times


def _torch_job(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _ort_job(session: Any, x: torch.Tensor) -> Callable[[], Any]:
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    return lambda: session.run(None, feed)


# ---- the benchmark ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """Everything one model needs for its paths: modules and ONNX files."""

    name: str
    eager: nn.Module
    deploy: nn.Module
    onnx: dict[str, Path]  # path name -> file
    nodes: dict[str, tuple[int | None, int | None]]


def prepare(
    name: str, paths: tuple[str, ...], img_size: int, workdir: Path, calib: torch.Tensor | None, log: Callable
) -> Prepared:
    """Build the eager and deploy models and export / quantize the ONNX files the paths need."""
    from .export import export_onnx, ort_nodes_after_optimization, quantize_onnx
    from .fused_ops import FusedOpsUnavailable, library_path

    eager = trained_like(build_model(name))
    deploy = deploy_model(name, eager)
    shape = (1, 3, img_size, img_size)
    onnx: dict[str, Path] = {}
    nodes: dict[str, tuple[int | None, int | None]] = {}
    if any(p.startswith("ort") for p in paths):
        t0 = time.perf_counter()
        if "ort" in paths or "ort-int8" in paths:
            res = export_onnx(deploy_model(name, eager, "onnx"), workdir / f"{name}.onnx", shape)
            onnx["ort"] = res.path
            nodes["ort"] = (res.nodes, ort_nodes_after_optimization(res.path))
        if "ort-fused" in paths and is_micronet(name):
            try:
                library_path()
            except FusedOpsUnavailable as err:
                log(f"  {name}: ort-fused skipped: {err}")
            else:
                fused = deploy_model(name, eager, "onnx", fused_ops=True)
                res = export_onnx(fused, workdir / f"{name}-fused.onnx", shape)
                onnx["ort-fused"] = res.path
                nodes["ort-fused"] = (res.nodes, ort_nodes_after_optimization(res.path))
        if "ort-plain" in paths and is_micronet(name):
            res = export_onnx(eager, workdir / f"{name}-plain.onnx", shape)
            onnx["ort-plain"] = res.path
            nodes["ort-plain"] = (res.nodes, ort_nodes_after_optimization(res.path))
        if "ort-legacy" in paths and is_micronet(name):
            res = export_onnx(eager, workdir / f"{name}-legacy.onnx", shape, exporter="legacy", simplify=False)
            onnx["ort-legacy"] = res.path
            nodes["ort-legacy"] = (res.nodes, ort_nodes_after_optimization(res.path))
        if "ort-int8" in paths:
            x = calib if calib is not None else _synthetic(img_size)
            onnx["ort-int8"] = quantize_onnx(onnx["ort"], workdir / f"{name}-int8.onnx", x)
            q = onnx["ort-int8"]
            from .export import count_nodes

            nodes["ort-int8"] = (count_nodes(q), ort_nodes_after_optimization(q))
        log(f"  {name}: exported {', '.join(onnx)} in {time.perf_counter() - t0:.1f} s")
    return Prepared(name, eager, deploy, onnx, nodes)


def _synthetic(img_size: int) -> torch.Tensor:
    from .export import synthetic_images

    return synthetic_images(32, 3, img_size)


def settings_for(threads_all: int, batch_large: int, include_large: bool = True) -> list[tuple[int, int]]:
    """(threads, batch): batch 1 with one thread and with all threads, and the throughput batch."""
    out = [(1, 1)]
    if threads_all > 1:
        out.append((threads_all, 1))
    if include_large and batch_large > 1:
        out.append((threads_all, batch_large))
    return out


def run_benchmark(
    models: tuple[str, ...] = DEFAULT_MODELS,
    paths: tuple[str, ...] = DEFAULT_PATHS,
    runs: int = 50,
    warmup: int = 10,
    img_size: int = 224,
    threads: int | None = None,
    batch: int = 32,
    calib: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
    out_dir: str | os.PathLike | None = None,
    max_seconds: float | None = 600.0,
    block: int = 10,
) -> tuple[list[Record], dict[str, Any]]:
    """Measure every model through every path at each setting; returns the records and the environment.

    Batch > 1 settings run ``max(5, runs // 5)`` rounds; every setting stops after ``max_seconds`` of
    timed rounds; results are saved after each setting when ``out_dir`` is given.
    """
    from .export import ort_session

    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"unknown path(s) {unknown}; choose from {PATHS}")
    threads_all = threads or os.cpu_count() or 1
    env = environment()
    env.update(
        runs=runs,
        warmup=warmup,
        img_size=img_size,
        max_seconds=max_seconds,
        block=block,
        calibration="given images"
        if calib is not None
        else "synthetic images (smooth random noise): int8 latency only, not accuracy",
    )
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(threads_all)
        prepared = [prepare(m, paths, img_size, Path(tmp), calib, log) for m in models]
        for n_threads, n_batch in settings_for(threads_all, batch):
            torch.set_num_threads(n_threads)
            x = torch.randn(n_batch, 3, img_size, img_size)
            jobs: dict[tuple[str, str], Callable[[], Any]] = {}
            for prep in prepared:
                for path in paths:
                    if path == "eager":
                        jobs[(prep.name, path)] = _torch_job(prep.eager, x)
                    elif path == "deploy":
                        jobs[(prep.name, path)] = _torch_job(prep.deploy, x)
                    elif path in prep.onnx:
                        jobs[(prep.name, path)] = _ort_job(ort_session(prep.onnx[path], n_threads), x)
            t0 = time.perf_counter()
            n_runs = runs if n_batch == 1 else max(5, runs // 5)
            times = time_round_robin(
                jobs, n_runs, warmup if n_batch == 1 else min(warmup, 3), max_seconds, block if n_batch == 1 else 1
            )
            took = time.perf_counter() - t0
            done = min(len(t) for t in times.values())
            log(f"  threads {n_threads}, batch {n_batch}: {len(jobs)} jobs x {done} runs in {took:.0f} s")
            for (name, path), ts in times.items():
                med = statistics.median(ts)
                nodes = next((p.nodes.get(path) for p in prepared if p.name == name), None) or (None, None)
                records.append(
                    Record(
                        model=name,
                        path=path,
                        threads=n_threads,
                        batch=n_batch,
                        median_ms=round(med * 1e3, 4),
                        mean_ms=round(statistics.fmean(ts) * 1e3, 4),
                        min_ms=round(min(ts) * 1e3, 4),
                        runs=len(ts),
                        images_per_s=round(n_batch / med, 1),
                        onnx_nodes=nodes[0],
                        ort_nodes=nodes[1],
                    )
                )
            if out_dir:  # partial results survive an interrupted run
                save(records, env, out_dir)
        torch.set_num_threads(threads_all)
    env["loadavg_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return records, env


# ---- reporting -------------------------------------------------------------------------------------------
def _lookup(records: list[Record], model: str, path: str, threads: int, batch: int) -> Record | None:
    for r in records:
        if (r.model, r.path, r.threads, r.batch) == (model, path, threads, batch):
            return r
    return None


def targets(records: list[Record]) -> list[str]:
    """The issue's three targets (1 thread, batch 1), when the run has the records they need."""
    out = []
    ref = _lookup(records, REFERENCE, "ort", 1, 1)
    for path in ("ort", "ort-fused"):  # standard operators only, then with the fused Dynamic Shift-Max
        m0 = _lookup(records, "micronet_m0", path, 1, 1)
        if ref and m0:
            ratio = m0.median_ms / ref.median_ms
            out.append(
                f"M0 {path} / {REFERENCE} ort = {m0.median_ms:.3f} / {ref.median_ms:.3f} ms = {ratio:.2f}x "
                f"(target <= 0.75x: {'met' if ratio <= 0.75 else 'NOT met'})"
            )
    m3 = _lookup(records, "micronet_m3", "ort", 1, 1)
    m3l, m3p = _lookup(records, "micronet_m3", "ort-legacy", 1, 1), _lookup(records, "micronet_m3", "ort-plain", 1, 1)
    for path in ("ort", "ort-fused"):
        m3x = _lookup(records, "micronet_m3", path, 1, 1)
        if m3x and m3l:
            speed = m3l.median_ms / m3x.median_ms
            out.append(
                f"M3 ort-legacy (plain export) / {path} = {m3l.median_ms:.3f} / {m3x.median_ms:.3f} ms = "
                f"{speed:.2f}x faster (target >= 1.4x: {'met' if speed >= 1.4 else 'NOT met'})"
            )
    if m3 and m3p:
        speed = m3p.median_ms / m3.median_ms
        out.append(
            f"M3 ort-plain (dynamo + onnxslim) / ort = {m3p.median_ms:.3f} / {m3.median_ms:.3f} ms = {speed:.2f}x "
            "faster (for comparison: that exporter already optimizes the plain graph)"
        )
    e, d = _lookup(records, "micronet_m0", "eager", 1, 1), _lookup(records, "micronet_m0", "deploy", 1, 1)
    if e and d:
        speed = e.median_ms / d.median_ms
        out.append(
            f"M0 eager / deploy = {e.median_ms:.3f} / {d.median_ms:.3f} ms = {speed:.2f}x faster "
            f"(target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'})"
        )
    return out


def markdown(records: list[Record], env: dict[str, Any]) -> str:
    """Tables: latency (ms, median) per setting, then throughput, then ONNX node counts and targets."""
    models = list(dict.fromkeys(r.model for r in records))
    paths = [p for p in PATHS if any(r.path == p for r in records)]
    settings = list(dict.fromkeys((r.threads, r.batch) for r in records))
    lines = [environment_line(env), ""]
    lines.append(
        f"Median of {env.get('runs')} runs (batch > 1: a fifth of that; each setting capped at "
        f"{env.get('max_seconds')} s) after {env.get('warmup')} warm-up runs, {env.get('img_size')}² input; "
        f"batch 1 timed in turns of {env.get('block', 1)} calls per job, the first untimed; "
        "weights random with trained-like BatchNorm statistics (seeded, every model alike); "
        f"int8 calibration: {env.get('calibration')}; load average at start {env.get('loadavg')}, "
        f"at end {env.get('loadavg_end')}."
    )
    for threads, batch in settings:
        unit = "ms per batch" if batch > 1 else "ms"
        lines += ["", f"**{threads} thread{'s' if threads > 1 else ''}, batch {batch}** ({unit}, median)", ""]
        lines.append("| model | " + " | ".join(paths) + " |")
        lines.append("|---|" + "---:|" * len(paths))
        for m in models:
            cells = []
            for p in paths:
                r = _lookup(records, m, p, threads, batch)
                if r is None:
                    cells.append("–")
                else:
                    cells.append(f"{r.median_ms:.3f}" + (f" ({r.images_per_s:.0f}/s)" if batch > 1 else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    node_rows = [
        (m, p, r.onnx_nodes, r.ort_nodes)
        for m in models
        for p in paths
        if (r := _lookup(records, m, p, *settings[0])) and r.onnx_nodes
    ]
    if node_rows:
        lines += ["", "**ONNX nodes** (in the file / after ONNX Runtime's fusions at ORT_ENABLE_ALL)", ""]
        lines += ["| model | path | file | ORT |", "|---|---|---:|---:|"]
        lines += [f"| {m} | {p} | {a} | {b} |" for m, p, a, b in node_rows]
    tgt = targets(records)
    if tgt:
        lines += ["", "**Targets (1 thread, batch 1)**", ""] + [f"- {t}" for t in tgt]
    return "\n".join(lines) + "\n"


def save(records: list[Record], env: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench.json", out / "bench.md"
    js.write_text(json.dumps(dict(environment=env, records=[asdict(r) for r in records]), indent=1))
    md.write_text(markdown(records, env))
    return js, md


def run_bench(args: argparse.Namespace) -> int:
    import sys

    calib = None
    if args.calib:
        from .data import DataConfig, default_policy
        from .export import calibration_images

        cfg = DataConfig(img_size=args.img_size, in_chans=3, policy=default_policy(args.img_size))
        calib, _ = calibration_images(args.calib, cfg, limit=64, split="train")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    env0 = environment()
    log(environment_line(env0))
    records, env = run_benchmark(
        models=tuple(args.models),
        paths=tuple(args.paths),
        runs=args.runs,
        warmup=args.warmup,
        img_size=args.img_size,
        threads=args.threads,
        batch=args.batch,
        calib=calib,
        log=log,
        out_dir=args.out_dir,
        max_seconds=args.max_seconds,
        block=args.block,
    )
    if args.out_dir:
        js, md = save(records, env, args.out_dir)
        log(f"saved {js} and {md}")
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=1))
    else:
        print(markdown(records, env))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="CPU latency/throughput: eager, deploy, ONNX Runtime fp32 and int8, vs MobileNetV3",
        description="Median latency (batch 1; one thread and all threads) and batch throughput of MicroNet and "
        "timm baselines through eager PyTorch, deploy mode, ONNX Runtime fp32 and int8.",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to run [M0-M3 + timm baselines]")
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS, help="inference paths [all]")
    p.add_argument("--runs", type=int, default=50, help="timed runs per measurement [50]")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs [10]")
    p.add_argument("--img-size", type=int, default=224, help="input size [224]")
    p.add_argument("--threads", type=int, help="'all threads' setting [os.cpu_count()]")
    p.add_argument("--batch", type=int, default=32, help="throughput batch size (1 skips it) [32]")
    p.add_argument("--calib", help="int8 calibration images (folder or fashion-mnist) [synthetic]")
    p.add_argument(
        "--block",
        type=int,
        default=10,
        help="batch-1 calls of one job per turn, the first untimed (steady-state latency; 1 = strict alternation) [10]",
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="cap on the timed rounds of one setting [600]")
    p.add_argument("--out-dir", help="save bench.json and bench.md here")
    p.add_argument("--json", action="store_true", help="print the records as JSON (progress goes to stderr)")
    p.set_defaults(func=run_bench)
