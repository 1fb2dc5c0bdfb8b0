"""The experiment report: per-budget head-to-head tables, ablations, longer recipes, and the figure, from the CSV."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any

from .._fs import atomic_write
from .._text import printable
from .experiment import ExperimentConfig, read_results, unique_results

# the columns of the results CSV the report reads
REPORT_COLUMNS = ("name", "study", "budget", "model", "variant", "img_size", "epochs", "seed", "top1", "madds",
                  "params", "train_seconds", "hardware", "command")  # fmt: skip


def _aggregate(rows: list[dict[str, str]], source: Path) -> dict[str, dict[str, Any]]:
    """Per run name: mean and spread of final top-1 over seeds, with its MAdds and parameters; a row whose
    numbers do not read is a ``ValueError`` naming the CSV and the run."""
    for row in rows:
        try:
            float(row["top1"]), int(row["madds"]), int(row["params"]), float(row["train_seconds"]), int(row["seed"])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{source}: the row of run {printable(row.get('name'), 80)!r} seed {printable(row.get('seed'), 20)} "
                f"does not hold numbers where the report needs them ({err}); fix or delete that row"
            ) from err
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
    rows = unique_results(read_results(cfg.results, REPORT_COLUMNS))  # a duplicate (run, seed) counts once
    agg = _aggregate(rows, cfg.results)
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
    text = "\n".join(lines).encode()
    atomic_write(cfg.report, lambda fh: fh.write(text))
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
