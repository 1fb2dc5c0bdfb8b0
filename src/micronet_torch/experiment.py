"""The experiment runner: named training runs from a TOML file, one results row each, and a report.

A config lists runs (model, ablation variant, input size, epochs, recipe) and seeds. ``run`` trains
each (run, seed) not yet in the results CSV, resuming a run that was interrupted, and appends one
row (accuracy, MAdds and parameters at that input size, training time, hardware, the command that
reproduces it). ``report`` turns the CSV into ``docs/results.md`` and an accuracy-vs-MAdds figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


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
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def model_cost(spec: RunSpec, num_classes: int) -> tuple[int, int]:
    """MAdds (the paper's rule) and parameters of the run's model at its input size."""
    from .baselines import build_model
    from .profiler import profile_model

    img = int(spec.train.get("img_size", 224))
    in_chans = int(spec.train.get("in_chans", 3))
    model = build_model(spec.model, num_classes=num_classes, in_chans=in_chans, **spec.variant)
    prof = profile_model(model, img_size=img, in_chans=in_chans)
    return prof.madds, prof.params


def train_one(cfg: ExperimentConfig, spec: RunSpec, seed: int) -> dict[str, Any]:
    """Train (or resume) one run at one seed and return its results row."""
    from .engine import TrainConfig, Trainer

    out = cfg.runs_dir / f"{spec.name}-s{seed}"
    fields = dict(spec.train)
    train_cfg = TrainConfig(
        model=spec.model, output=str(out), seed=seed, model_kwargs=dict(spec.variant), quiet=True, **fields
    )
    resume = "auto" if (out / "last.pt").is_file() else None
    start = time.time()
    summary = Trainer(train_cfg, resume=resume, overwrite=resume is None).run()
    summary_file = out / "summary.json"
    if summary_file.is_file():
        summary = {**json.loads(summary_file.read_text()), **(summary or {})}
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
        if not dry_run and (spec.name, seed) in {(r["name"], int(r["seed"])) for r in read_results(cfg.results)}:
            print(f"experiment: {spec.name} seed {seed} finished meanwhile (another process); skipped", flush=True)
            continue
        print(f"experiment: {spec.name} seed {seed} ({spec.model}, {spec.variant or 'published'})", flush=True)
        if dry_run:
            trained.append((spec.name, seed))
            continue
        row = train_one(cfg, spec, seed)
        append_result(cfg.results, row)
        trained.append((spec.name, seed))
        print(f"experiment: {spec.name} seed {seed}: top-1 {row['top1']:.2f} in {row['train_seconds']} s", flush=True)
    return trained


# ---- report ---------------------------------------------------------------------------------------
def _aggregate(rows: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Per run name: mean and spread of final top-1 over seeds, with its MAdds and parameters."""
    by_name: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = {}
    for name, group in by_name.items():
        accs = [float(r["top1"]) for r in group]
        out[name] = dict(
            name=name,
            study=group[0]["study"],
            budget=group[0]["budget"],
            model=group[0]["model"],
            variant=group[0]["variant"],
            madds=int(group[0]["madds"]),
            params=int(group[0]["params"]),
            img_size=group[0]["img_size"],
            epochs=group[0]["epochs"],
            n=len(accs),
            mean=statistics.fmean(accs),
            std=statistics.stdev(accs) if len(accs) > 1 else float("nan"),
            low=min(accs),
            high=max(accs),
            seconds=statistics.fmean(float(r["train_seconds"]) for r in group),
            hardware=group[0]["hardware"],
            seeds=sorted(int(r["seed"]) for r in group),
        )
    return out


def _acc(a: dict[str, Any]) -> str:
    spread = "" if math.isnan(a["std"]) else f" ± {a['std']:.2f}"
    return f"{a['mean']:.2f}{spread} (n={a['n']}; {a['low']:.2f}–{a['high']:.2f})"


def write_report(cfg: ExperimentConfig) -> Path:
    """``docs/results.md``-style tables (head-to-head per budget, ablations) and the figure, from the CSV."""
    rows = read_results(cfg.results)
    agg = _aggregate(rows)
    notes = {spec.name: spec.note for spec in cfg.runs}
    lines = [f"# {cfg.title}", ""]
    if cfg.notes:
        lines += [cfg.notes.strip(), ""]
    rel_cfg = os.path.relpath(cfg.path, cfg.report.parent)
    lines += [
        f"Every number below is produced by `micronet experiment run {cfg.path.as_posix()}` and "
        f"`micronet experiment report {cfg.path.as_posix()}` from [the results CSV]"
        f"({os.path.relpath(cfg.results, cfg.report.parent)}) (config: [{cfg.path.name}]({rel_cfg})). "
        "Accuracy is the final-epoch top-1 on the test set, mean ± standard deviation over seeds "
        "(range in brackets); MAdds by the paper's rule at the run's input size.",
        "",
    ]
    pending = [
        (s.name, seed) for s in cfg.runs for seed in s.seeds if s.name not in agg or seed not in agg[s.name]["seeds"]
    ]
    budget = [a for a in agg.values() if a["study"] == "budget"]
    if budget:
        lines += ["## MicroNet against MobileNetV3-Small at matched MAdds", ""]
        lines += [
            "| budget | model | MAdds (M) | params | top-1 (%) | Δ MicroNet − MobileNetV3 |",
            "|---|---|---|---|---|---|",
        ]
        pairs = {}  # budget -> (its runs, MicroNet first; the MicroNet run; the MobileNetV3 run)
        for b in sorted({a["budget"] for a in budget}):
            pair = sorted((a for a in budget if a["budget"] == b), key=lambda a: not a["model"].startswith("micronet"))
            micro = next((a for a in pair if a["model"].startswith("micronet")), None)
            other = next((a for a in pair if not a["model"].startswith("micronet")), None)
            pairs[b] = pair, micro, other
        for b, (pair, micro, other) in pairs.items():
            delta = ""
            if micro and other:
                delta = f"{micro['mean'] - other['mean']:+.2f}"
            for a in pair:
                lines.append(
                    f"| {b} | `{a['model']}` | {a['madds'] / 1e6:.3f} | {a['params']:,} | {_acc(a)} | "
                    f"{delta if a is micro else ''} |"
                )
        lines.append("")
        for b, (_, micro, other) in pairs.items():
            if micro and other:
                d = micro["mean"] - other["mean"]
                verdict = "beats" if d > 0 else "trails"
                lines.append(
                    f"- {b}: `{micro['model']}` {verdict} `{other['model']}` by {abs(d):.2f} points "
                    f"({micro['madds'] / 1e6:.3f} vs {other['madds'] / 1e6:.3f} M MAdds)."
                )
        lines.append("")
    ablation = [a for a in agg.values() if a["study"] == "ablation"]
    if ablation:
        base = agg.get(cfg.ablation_baseline or "")
        lines += ["## Ablations", ""]
        if base:
            lines += [
                f"Each operator replaced in `{base['model']}`; Δ against `{base['name']}` (the published operators).",
                "",
            ]
        lines += [
            "| run | variant | MAdds (M) | params | top-1 (%) | Δ vs published ops |",
            "|---|---|---|---|---|---|",
        ]
        for a in ([base] if base else []) + ablation:
            delta = f"{a['mean'] - base['mean']:+.2f}" if base and a is not base else ""
            lines.append(
                f"| {a['name']} | {a['variant'] or 'published'} | {a['madds'] / 1e6:.3f} | {a['params']:,} | "
                f"{_acc(a)} | {delta} |"
            )
        lines.append("")
        if base:
            spread = base["high"] - base["low"]
            for a in ablation:
                d = a["mean"] - base["mean"]
                noisy = " (within the baseline's seed range, so not a clear effect)" if abs(d) <= spread else ""
                what = "costs" if d < 0 else "gains"
                lines.append(
                    f"- `{a['name']}` {what} {abs(d):.2f} points over {a['n']} seed(s) at "
                    f"{a['madds'] / base['madds']:.2f}× the MAdds{noisy}."
                )
            lines.append("")
    longer = [a for a in agg.values() if a["study"] == "best"]
    if longer:
        lines += [
            "## Longer recipes",
            "",
            "| run | model | recipe | MAdds (M) | params | top-1 (%) |",
            "|---|---|---|---|---|---|",
        ]
        for a in sorted(longer, key=lambda a: a["madds"]):
            note = notes.get(a["name"]) or f"{a['epochs']} epochs"
            lines.append(
                f"| {a['name']} | `{a['model']}` | {note} | {a['madds'] / 1e6:.3f} | {a['params']:,} | {_acc(a)} |"
            )
        lines.append("")
    if agg:
        published = [a for a in agg.values() if a["model"].startswith("micronet") and a["study"] in ("budget", "best")]
        best = max(published, key=lambda a: a["mean"], default=None)
        if best:
            lines.append(
                f"Best MicroNet: `{best['name']}` at {best['mean']:.2f} % ({best['madds'] / 1e6:.3f} M MAdds, "
                f"{best['img_size']}px, {best['epochs']} epochs)."
            )
            if cfg.target_top1 is not None:
                gap = best["mean"] - cfg.target_top1
                where = "above" if gap >= 0 else "below"
                label = cfg.target_label or "the target"
                lines.append(f"That is {abs(gap):.2f} points {where} the {cfg.target_top1:.1f} % of {label}.")
            lines.append("")
    if pending:
        lines += [f"Not yet run ({len(pending)}): " + ", ".join(f"{n} seed {s}" for n, s in pending), ""]
    lines += ["## Reproduce", "", "| run | seed | hardware | train time (s) | command |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seed']} | {r['hardware']} | {r['train_seconds']} | `{r['command']}` |")
    lines.append("")
    if budget or ablation or longer:
        _plot(agg, cfg.figure)
        rel = os.path.relpath(cfg.figure, cfg.report.parent)
        lines += [f"![accuracy vs MAdds]({rel}.png)", ""]
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    cfg.report.write_text("\n".join(lines))
    return cfg.report


def _plot(agg: dict[str, dict[str, Any]], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups = {
        "MicroNet": [a for a in agg.values() if a["model"].startswith("micronet") and a["study"] == "budget"],
        "MobileNetV3-Small": [a for a in agg.values() if not a["model"].startswith("micronet")],
        "MicroNet ablations": [a for a in agg.values() if a["study"] == "ablation"],
        "MicroNet, longer recipe": [a for a in agg.values() if a["study"] == "best"],
    }
    for (label, items), marker in zip(groups.items(), ("o-", "s--", "x", "D"), strict=True):
        items = sorted(items, key=lambda a: a["madds"])
        if not items:
            continue
        xs = [a["madds"] / 1e6 for a in items]
        ys = [a["mean"] for a in items]
        errs = [0.0 if math.isnan(a["std"]) else a["std"] for a in items]
        ax.errorbar(
            xs, ys, yerr=errs, fmt=marker, capsize=3, label=label, linestyle="none" if marker in ("x", "D") else None
        )
        if label in ("MicroNet ablations", "MicroNet, longer recipe"):
            for a in items:
                ax.annotate(
                    a["name"], (a["madds"] / 1e6, a["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
    ax.set_xlabel("MAdds (millions, paper's rule, at the run's input size)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST: accuracy against MAdds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    fig.savefig(stem.with_suffix(".svg"))
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    from .engine import Interrupted

    cfg = load_config(args.config)
    try:
        run_experiments(cfg, only=args.only, seeds=args.seeds, dry_run=args.dry_run)
    except Interrupted as stop:
        print(f"experiment: {stop}; the run in progress saved its last epoch, run the same command to resume")
        return 128 + stop.signum
    if not args.dry_run:
        print(f"experiment: report written to {write_report(cfg)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(f"experiment: report written to {write_report(cfg)}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of named training runs and report the results")
    esub = p.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)
    r = esub.add_parser("run", help="train every run not yet in the results CSV (resumes interrupted ones)")
    r.add_argument("config", help="experiment TOML, e.g. benchmarks/fashion_mnist.toml")
    r.add_argument("--only", nargs="+", default=None, help="run names to train")
    r.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds to train (default: the config's)")
    r.add_argument("--dry-run", action="store_true", help="list what would be trained")
    r.set_defaults(func=_run)
    q = esub.add_parser("report", help="write the results Markdown and the accuracy-vs-MAdds figure")
    q.add_argument("config")
    q.set_defaults(func=_report)
