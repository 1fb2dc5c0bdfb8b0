"""``micronet bench-train``: training images/s and peak memory, eager vs fused vs compile vs the ReLU floor."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..tools.bench_report import TRAIN_VARIANTS as VARIANTS
from .common import nonnegative_int, positive_int

# the benchmark (torch, the models) is imported inside ``run_bench_train``: the parser is built without it

DEFAULT_MODELS = ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3", "mobilenetv3_small_050",
                  "mobilenetv3_small_100")  # fmt: skip


def _setting(text: str) -> tuple[int, int]:
    try:
        size, batch = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected SIZExBATCH like 224x32, got {text!r}") from err
    return size, batch


def run_bench_train(args: argparse.Namespace) -> int:
    from .._env import available_cores
    from ..tools.bench_report import check_out_dir
    from ..tools.bench_train import environment, markdown, run, save

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    check_out_dir(args.out_dir, "bench_train", args.overwrite)
    env = environment(args.steps, args.warmup)
    rows = []
    for threads in args.threads or sorted({1, available_cores()}):
        rows += run(args.models, args.settings, args.variants, args.steps, args.warmup, threads, log)
        if args.out_dir:  # partial results survive an interrupted run
            save(rows, env, args.out_dir)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, env))
    return 0


def register_cli(sub: Any) -> None:
    p = sub.add_parser(
        "bench-train",
        help="training images/s and peak memory: Dynamic Shift-Max eager, fused, compile, and the ReLU floor",
        description="Forward + backward + SGD step of each model with every Dynamic Shift-Max run eagerly, fused, "
        "through torch.compile, and replaced by ReLU (the floor), interleaved step by step.",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--settings", nargs="+", type=_setting, default=[(224, 32), (32, 128)], help="SIZExBATCH ...")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per variant (interleaved) [5]")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed steps after the first [1]")
    p.add_argument("--threads", type=positive_int, nargs="+", help="CPU thread counts [1 and all cores]")
    p.add_argument("--out-dir", help="save bench_train.json and bench_train.md here")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out-dir")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run_bench_train)
