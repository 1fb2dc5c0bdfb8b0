"""``micronet status DIR``: whether a run folder's run is live, finished, failed, or interrupted (and how to resume).

A run killed with ``kill -9`` cannot update its ``summary.json``; its lock (``train.run_folder``) tells the truth:
a ``running`` summary whose holder is gone reads ``interrupted``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._text import PATH_LIMIT, PRINT_LIMIT, one_line, printable


def run(args: argparse.Namespace) -> int:
    from ..train.run_folder import run_status  # here, not at the top: the parser is built without torch

    st = run_status(args.folder)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    # every value comes from a file anyone may have written: printed escaped and cut (``_text.printable``)
    done, total = st.get("epochs_completed"), st.get("epochs")
    progress = f", {printable(done, 20)}/{printable(total, 20)} epochs" if done is not None and total else ""
    best = f", best top-1 {st['best_top1']:.2f}" if type(st.get("best_top1")) in (int, float) else ""
    error = f" ({one_line(st['error'], PRINT_LIMIT)})" if st.get("error") else ""
    print(f"{printable(args.folder, PATH_LIMIT)}: {printable(st['status'], 40)}{progress}{best}{error}")
    if st["hint"]:
        print(f"  {printable(st['hint'], PATH_LIMIT)}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="is a run folder's run live, completed, failed or interrupted",
        description="The state of a training run folder: running (a live process holds it), completed, failed, "
        "diverged or interrupted (killed or stopped; with the command that resumes it).",
    )
    p.add_argument("folder", help="a run folder (micronet train --output)")
    p.add_argument("--json", action="store_true", help="print the summary with the live status as JSON")
    p.set_defaults(func=run)
