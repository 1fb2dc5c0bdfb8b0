"""``micronet bench``'s tables: latency per setting, throughput, ONNX node counts, and the ratio lines."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._fs import atomic_write

MCU_SIZES = (64, 96, 128, 160, 224)  # micronet bench --mcu's input sizes

PATHS = ("eager", "deploy", "ort", "ort-fused", "ort-int8", "ort-plain", "ort-legacy")
# the names the benchmark commands take (``micronet bench``, ``bench --runtimes``, ``bench-train``): data only, in
# this module without torch so that the command line builds its parser without loading the benchmarks
MICRONETS = ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3")
TIMM_BASELINES = ("mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100", "lcnet_050")
DEFAULT_MODELS = MICRONETS + TIMM_BASELINES
# bench name -> export format (``runtime.targets.TARGETS``)
RUNTIMES = {"ort": "onnx", "openvino": "openvino", "executorch": "executorch", "tflite": "tflite", "ncnn": "ncnn"}
# the same runtimes with each MicroNet's Dynamic Shift-Max as one micronet.ShiftMax operation (--fused-ops)
FUSED_RUNTIMES = {"ort-ops": "onnx", "openvino-ops": "openvino", "executorch-ops": "executorch"}
ALL_RUNTIMES = {**RUNTIMES, **FUSED_RUNTIMES}
# how ``bench-train`` runs each Dynamic Shift-Max: eagerly, fused, through torch.compile, replaced by ReLU
TRAIN_VARIANTS = ("eager", "fused", "compile", "relu")
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


def environment_line(env: dict[str, Any]) -> str:
    load = env.get("loadavg")
    return (
        f"CPU: {env['cpu']} ({env['cores']} cores), load {load} | torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}, timm {env['timm']}, Python {env['python']}"
    )


def _lookup(records: list[Record], model: str, path: str, threads: int, batch: int) -> Record | None:
    for r in records:
        if (r.model, r.path, r.threads, r.batch) == (model, path, threads, batch):
            return r
    return None


def targets(records: list[Record]) -> list[str]:
    """The project's internal latency targets (1 thread, batch 1), when the run has the records they need."""
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


def markdown(records: list[Record], env: dict[str, Any], show_targets: bool = False) -> str:
    """Tables: latency (ms, median) per setting, then throughput, then ONNX node counts.

    The project's internal targets (``targets``) are for its docs, not users: only with ``show_targets``.
    """
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
    tgt = targets(records) if show_targets else []
    if tgt:
        lines += ["", "**Targets (1 thread, batch 1)**", ""] + [f"- {t}" for t in tgt]
    return "\n".join(lines) + "\n"


def check_out_dir(out_dir: str | os.PathLike | None, stem: str, overwrite: bool = False) -> None:
    """Before any timing: refuse an ``out_dir`` that holds an earlier run's ``<stem>.json`` (its results would be
    replaced, maybe by a shorter run's) unless ``overwrite``; other benchmarks' files may share the folder."""
    if out_dir and not overwrite and (Path(out_dir) / f"{stem}.json").exists():
        raise ValueError(
            f"--out-dir {out_dir} holds an earlier run's {stem}.json: give a new --out-dir, or --overwrite to "
            "replace it"
        )


def save_report(out_dir: str | os.PathLike, stem: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    """``<stem>.json`` (``payload``) and ``<stem>.md`` (``table``) in ``out_dir``, each written atomically: what
    every benchmark command saves (``bench``, ``bench --runtimes``, ``bench-train``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    data, text = json.dumps(payload, indent=1).encode(), table.encode()
    atomic_write(js, lambda fh: fh.write(data))
    atomic_write(md, lambda fh: fh.write(text))
    return js, md


def save(records: list[Record], env: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``bench.json`` (environment + records) and ``bench.md`` in ``out_dir``."""
    payload = dict(environment=env, records=[asdict(r) for r in records])
    return save_report(out_dir, "bench", payload, markdown(records, env))
