"""``micronet bench``: CPU latency and throughput of MicroNet and MobileNetV3 through every inference path.

Paths: ``eager`` (PyTorch eval mode), ``deploy`` (deploy-mode PyTorch), ``ort`` (ONNX Runtime fp32 of
the deploy graph), ``ort-int8`` (ONNX Runtime static int8), and ``ort-plain`` (ONNX Runtime fp32 of the
eager graph through the dynamo exporter + onnxslim, MicroNet only), and ``ort-legacy`` (ONNX Runtime fp32
of the eager graph through the legacy TorchScript exporter, unsimplified: the "plain export" most
users start from), and ``ort-fused`` (ONNX Runtime fp32 of the deploy graph with every
Dynamic Shift-Max as one ``micronet.ShiftMax`` operator from the library in ``fused_ops.py``; MicroNet
only). All paths of one
setting (threads, batch) are timed round-robin, one call each in turn, so that a change in machine
load hits every path alike and ratios within a run stay meaningful on a shared CPU.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from timm.utils.model import reparameterize_model
from torch import nn

from .._env import cpu_name
from ..deploy import convert_to_deploy
from ..kernels.ort_ops import FusedOpsUnavailable, library_path
from ..models import build_model, is_micronet
from ..runtime import (
    ExportOptions,
    count_nodes,
    export_model,
    ort_nodes_after_optimization,
    ort_session,
    quantize_onnx,
    synthetic_images,
)
from .bench_report import DEFAULT_MODELS, MICRONETS, PATHS, TIMM_BASELINES, Record, save  # noqa: F401 (names kept here)

DEFAULT_PATHS = PATHS


# ---- environment ------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """CPU, core count, load and library versions: the line printed above every table."""
    import onnxruntime  # onnxruntime takes a second to import: only when benchmarking

    return dict(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        loadavg=[round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        torch=torch.__version__,
        onnxruntime=onnxruntime.__version__,
        timm=timm.__version__,
    )


# ---- models -----------------------------------------------------------------------------------------
def bench_model(name: str) -> nn.Module:
    """A MicroNet or a timm model (``models.build_model``), random weights, eval mode."""
    return build_model(name).eval()


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


def deploy_model(name: str, model: nn.Module) -> nn.Module:
    """MicroNet: ``convert_to_deploy``. timm: ``reparameterize_model`` (a no-op for these models: timm
    has no BatchNorm folding for MobileNetV3 / LCNet, so their deploy path equals eager)."""
    if is_micronet(name):
        return convert_to_deploy(model)
    return reparameterize_model(model)


# ONNX Runtime paths: the export options of each (``runtime.export_model``); MicroNet-only paths marked
ORT_PATHS: dict[str, tuple[ExportOptions, bool]] = {
    "ort": (ExportOptions(format="onnx"), False),
    "ort-fused": (ExportOptions(format="onnx", fused_ops=True), True),
    "ort-plain": (ExportOptions(format="onnx", deploy=False), True),
    "ort-legacy": (ExportOptions(format="onnx", deploy=False, exporter="legacy", simplify=False), True),
}


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
    eager = trained_like(bench_model(name))
    deploy = deploy_model(name, eager)
    shape = (1, 3, img_size, img_size)
    onnx: dict[str, Path] = {}
    nodes: dict[str, tuple[int | None, int | None]] = {}
    if not any(p.startswith("ort") for p in paths):
        return Prepared(name, eager, deploy, onnx, nodes)
    t0 = time.perf_counter()
    micronet = is_micronet(name)
    wanted = [p for p in ORT_PATHS if p in paths or (p == "ort" and "ort-int8" in paths)]
    for path in wanted:
        options, micronet_only = ORT_PATHS[path]
        if micronet_only and not micronet:
            continue
        if options.fused_ops:
            try:
                library_path()
            except FusedOpsUnavailable as err:
                log(f"  {name}: ort-fused skipped: {err}")
                continue
        if not micronet:  # timm models have no deploy form: export them as they are
            options = replace(options, deploy=False)
        res = export_model(eager, workdir / f"{name}-{path}.onnx", shape, options)
        onnx[path] = res.path
        nodes[path] = (res.nodes, ort_nodes_after_optimization(res.path))
    if "ort-int8" in paths:
        x = calib if calib is not None else synthetic_images(32, 3, img_size)
        q = quantize_onnx(onnx["ort"], workdir / f"{name}-int8.onnx", x)
        onnx["ort-int8"] = q
        nodes["ort-int8"] = (count_nodes(q), ort_nodes_after_optimization(q))
    log(f"  {name}: exported {', '.join(onnx)} in {time.perf_counter() - t0:.1f} s")
    return Prepared(name, eager, deploy, onnx, nodes)


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
