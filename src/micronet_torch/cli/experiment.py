"""``micronet experiment run|report``: named training grids and their report (``tools.experiment``)."""

from __future__ import annotations

import argparse

from .common import nonnegative_int

# the experiment runner (torch, the training loop) is imported inside each action: the parser is built without it


def _run(args: argparse.Namespace) -> int:
    from ..tools.experiment import load_config, run_experiments
    from ..tools.experiment_report import write_report
    from ..train import Interrupted

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
    from ..tools.experiment import load_config
    from ..tools.experiment_report import write_report

    cfg = load_config(args.config)
    print(f"experiment: report written to {write_report(cfg)}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of named training runs and report the results")
    esub = p.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)
    r = esub.add_parser("run", help="train every run not yet in the results CSV (resumes interrupted ones)")
    r.add_argument("config", help="experiment TOML, e.g. benchmarks/fashion_mnist.toml")
    r.add_argument("--only", nargs="+", default=None, help="run names to train")
    r.add_argument(
        "--seeds", nargs="+", type=nonnegative_int, default=None, help="seeds to train (default: the config's)"
    )
    r.add_argument("--dry-run", action="store_true", help="list what would be trained")
    r.set_defaults(func=_run)
    q = esub.add_parser("report", help="write the results Markdown and the accuracy-vs-MAdds figure")
    q.add_argument("config")
    q.set_defaults(func=_report)
