"""The experiment runner: named training runs from a TOML file, one results row each, and a report.

A config lists runs (model, ablation variant, input size, epochs, recipe) and seeds. ``run`` trains
each (run, seed) not yet in the results CSV, resuming a run that was interrupted, and appends one
row (accuracy, MAdds and parameters at that input size, training time, hardware, the command that
reproduces it). ``report`` turns the CSV into ``docs/results.md`` and an accuracy-vs-MAdds figure.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .._env import cpu_name
from .._text import printable
from ..models import build_model, profile_model
from ..train import TrainConfig, Trainer
from ..train.run_folder import Lock, claim, read_summary

RESULT_FIELDS = [
    "name",
    "study",
    "budget",
    "model",
    "variant",
    "img_size",
    "epochs",
    "seed",
    "top1",
    "top5",
    "best_top1",
    "madds",
    "params",
    "train_seconds",
    "train_images_per_second",
    "hardware",
    "torch",
    "finished",
    "command",
]


@dataclass
class RunSpec:
    """One named run of the config (trained once per seed)."""

    name: str
    model: str
    study: str = "budget"
    budget: str = ""
    variant: dict[str, str] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields: data, img_size, epochs, ...
    seeds: list[int] = field(default_factory=lambda: [0])
    note: str = ""  # what sets the run apart, for the report (e.g. "40 epochs, random erasing 0.25")


@dataclass
class ExperimentConfig:
    path: Path
    title: str
    results: Path
    runs_dir: Path
    report: Path
    figure: Path
    runs: list[RunSpec]
    notes: str = ""
    ablation_baseline: str | None = None
    target_top1: float | None = None  # a reference accuracy the best MicroNet is compared with
    target_label: str = ""


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read an experiment TOML: top-level paths, ``[defaults]`` for every run, and ``[[run]]`` tables."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    root = path.parent
    defaults = dict(raw.get("defaults", {}))
    default_seeds = defaults.pop("seeds", [0])
    runs = []
    for i, entry in enumerate(raw.get("run", [])):
        entry = dict(entry)
        for key in ("name", "model"):
            if key not in entry:
                raise ValueError(f"{path}: run #{i + 1} has no {key!r}")
        check_run(path, i, entry, defaults, default_seeds)
        spec = RunSpec(
            name=entry.pop("name"),
            model=entry.pop("model"),
            study=entry.pop("study", "budget"),
            budget=str(entry.pop("budget", "")),
            variant=dict(entry.pop("variant", {})),
            seeds=list(entry.pop("seeds", default_seeds)),
            note=str(entry.pop("note", "")),
        )
        spec.train = {**defaults, **entry}
        runs.append(spec)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names must be unique; got {names}")
    return ExperimentConfig(
        path=path,
        title=raw.get("title", path.stem),
        results=(root / raw.get("results", f"{path.stem}.csv")).resolve(),
        runs_dir=(root / raw.get("runs_dir", f"runs/{path.stem}")).resolve(),
        report=(root / raw.get("report", f"{path.stem}.md")).resolve(),
        figure=(root / raw.get("figure", f"{path.stem}_accuracy_vs_madds")).resolve(),
        runs=runs,
        notes=raw.get("notes", ""),
        ablation_baseline=raw.get("ablation_baseline"),
        target_top1=float(raw["target_top1"]) if "target_top1" in raw else None,
        target_label=str(raw.get("target_label", "")),
    )


# a run's name becomes a folder name, runs_dir/NAME-sSEED: one path component, never "..", a separator or a
# leading dot (a hidden file, or ".claims")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
# the settings the runner sets itself for each (run, seed)
RUNNER_SETTINGS = ("output", "seed", "model_kwargs", "quiet")


def check_run(path: Path, index: int, entry: dict[str, Any], defaults: dict[str, Any], seeds: Any) -> None:
    """Refuse a ``[[run]]`` whose name could leave ``runs_dir`` (``../x``, ``/abs``, ``a/b``), whose seeds are not
    whole numbers, or whose settings are not ``TrainConfig``'s (or are the runner's own); the message names it."""
    name = entry["name"]
    where = f"{path}: run #{index + 1}"
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ValueError(
            f"{where}: name {printable(name, 80)!r} is not a plain name: use up to 100 letters, digits, '.', '_', "
            "'+' and '-', starting with a letter or digit (each run trains in runs_dir/NAME-sSEED)"
        )
    if not isinstance(entry["model"], str):
        raise ValueError(f"{where} ({name}): model {printable(entry['model'], 80)!r} is not a model name")
    seeds = entry.get("seeds", seeds)
    if not isinstance(seeds, list) or not all(type(s) is int and s >= 0 for s in seeds):
        raise ValueError(f"{where} ({name}): seeds {printable(seeds, 80)} must be a list of whole numbers 0 or more")
    known = {f.name for f in fields(TrainConfig)}
    extra = set(entry) - {"name", "model", "study", "budget", "variant", "seeds", "note"}
    for key in sorted(extra | set(defaults)):
        if key not in known or key in RUNNER_SETTINGS or key == "model":
            raise ValueError(
                f"{where} ({name}): {printable(key, 80)!r} is not a training setting the grid may set (see "
                "TrainConfig; the runner sets the output folder, seed and variant itself)"
            )


def _inside(folder: Path, child: Path) -> Path:
    """``child`` resolved, refused unless it lies inside ``folder`` (the name checks make this hold; kept as a
    guard should a link inside ``runs_dir`` point elsewhere)."""
    resolved = child.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ValueError(f"{child} resolves to {resolved}, outside runs_dir {folder}; rename the run")
    return resolved


def read_results(path: Path, columns: tuple[str, ...] = ("name", "seed")) -> list[dict[str, str]]:
    """The rows of the results CSV (none when it does not exist yet); refuses a CSV without ``columns``."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing and (rows or reader.fieldnames):
        raise ValueError(
            f"{path}: the results CSV has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}; it was not "
            "written by micronet experiment run (or was edited): restore it, or move it away to start over"
        )
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row (header first when the file is new), flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in RESULT_FIELDS})
        fh.flush()
        os.fsync(fh.fileno())


def hardware() -> str:
    """A short description of where a run trained: the GPU, or the CPU model and thread count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA)"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def model_cost(spec: RunSpec, num_classes: int) -> tuple[int, int]:
    """MAdds (the paper's rule) and parameters of the run's model at its input size."""
    img = int(spec.train.get("img_size", 224))
    in_chans = int(spec.train.get("in_chans", 3))
    model = build_model(spec.model, num_classes=num_classes, in_chans=in_chans, **spec.variant)
    prof = profile_model(model, img_size=img, in_chans=in_chans)
    return prof.madds, prof.params


def train_one(cfg: ExperimentConfig, spec: RunSpec, seed: int) -> dict[str, Any]:
    """Train (or resume) one run at one seed and return its results row."""
    out = _inside(cfg.runs_dir, cfg.runs_dir / f"{spec.name}-s{seed}")
    fields = dict(spec.train)
    train_cfg = TrainConfig(
        model=spec.model, output=str(out), seed=seed, model_kwargs=dict(spec.variant), quiet=True, **fields
    )
    resume = "auto" if (out / "last.pt").is_file() else None
    start = time.time()
    given = {"model", "output", "seed", "model_kwargs", "quiet", *fields}  # what the grid sets
    summary = Trainer(train_cfg, resume=resume, overwrite=resume is None, given=given).run()
    summary_file = out / "summary.json"
    if summary_file.is_file():
        summary = {**read_summary(summary_file), **(summary or {})}
    num_classes = int(summary.get("num_classes", 10))
    madds, params = model_cost(spec, num_classes)
    return dict(
        name=spec.name,
        study=spec.study,
        budget=spec.budget,
        model=spec.model,
        variant=json.dumps(spec.variant, sort_keys=True) if spec.variant else "",
        img_size=fields.get("img_size", ""),
        epochs=summary.get("epochs_completed", fields.get("epochs", "")),
        seed=seed,
        top1=round(float(summary["final_top1"]), 3),
        top5=round(float(summary.get("final_top5", float("nan"))), 3),
        best_top1=round(float(summary.get("best_top1", float("nan"))), 3),
        madds=madds,
        params=params,
        train_seconds=round(float(summary.get("train_seconds", time.time() - start)), 1),
        train_images_per_second=round(float(summary.get("train_images_per_second", 0.0)), 1),
        hardware=hardware(),
        torch=torch.__version__,
        finished=time.strftime("%Y-%m-%d %H:%M"),
        command=f"micronet experiment run {cfg.path.as_posix()} --only {spec.name} --seeds {seed}",
    )


def run_experiments(
    cfg: ExperimentConfig, only: list[str] | None = None, seeds: list[int] | None = None, dry_run: bool = False
) -> list[tuple[str, int]]:
    """Train every (run, seed) missing from the results CSV, in config order; returns what it trained."""
    done = {(r["name"], int(r["seed"])) for r in read_results(cfg.results)}
    unknown = set(only or []) - {r.name for r in cfg.runs}
    if unknown:
        raise ValueError(f"--only: no run named {sorted(unknown)} in {cfg.path}")
    todo = [
        (spec, seed)
        for spec in cfg.runs
        if not only or spec.name in only
        for seed in (seeds if seeds is not None else spec.seeds)
        if (spec.name, seed) not in done
    ]
    trained = []
    for spec, seed in todo:
        if dry_run:
            print(f"experiment: {spec.name} seed {seed} ({spec.model}, {spec.variant or 'published'})", flush=True)
            trained.append((spec.name, seed))
            continue
        lock = claim_pair(cfg, spec.name, seed)
        if lock is None:
            print(f"experiment: {spec.name} seed {seed} is being trained by another process; skipped", flush=True)
            continue
        try:
            if (spec.name, seed) in {(r["name"], int(r["seed"])) for r in read_results(cfg.results)}:
                print(f"experiment: {spec.name} seed {seed} finished meanwhile (another process); skipped", flush=True)
                continue
            print(f"experiment: {spec.name} seed {seed} ({spec.model}, {spec.variant or 'published'})", flush=True)
            row = train_one(cfg, spec, seed)
            append_result(cfg.results, row)
        finally:
            lock.release()
        trained.append((spec.name, seed))
        print(f"experiment: {spec.name} seed {seed}: top-1 {row['top1']:.2f} in {row['train_seconds']} s", flush=True)
    return trained


def claim_pair(cfg: ExperimentConfig, name: str, seed: int) -> Lock | None:
    """Claim (run, seed) for this process (a claim file in ``runs_dir/.claims``), or None when a live one holds it.

    A claim of a process that died is stale and taken over, like a run folder's lock (``train.run_folder``).
    """
    folder = cfg.runs_dir / ".claims"
    folder.mkdir(parents=True, exist_ok=True)
    return claim(_inside(folder, folder / f"{name}-s{seed}.lock"), f"{name} seed {seed}")


def unique_results(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows with one per (run, seed): the first written wins (older CSVs may hold duplicates)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for row in rows:
        key = (row.get("name", ""), str(row.get("seed", "")))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out
