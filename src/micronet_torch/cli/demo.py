"""``micronet demo``: the README's main job (``tools.demo``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..train.recipes import DEMO
from .common import nonnegative_int, positive_int


def _run(args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo  # here, not at the top: the parser is built without torch

    return run_demo(
        output=args.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        img_size=args.img_size,
        threads=args.threads,
        device=args.device,
        data_root=args.data_root,
        seed=args.seed,
        fresh=args.fresh,
    )


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train MicroNet-M0 on Fashion-MNIST, evaluate, predict (the README's first command)",
        description="Train MicroNet-M0 on Fashion-MNIST, evaluate it, predict a few test images, and say where "
        "everything is.",
    )
    p.add_argument("--output", "-o", default="runs/demo", help="run folder [runs/demo]")
    p.add_argument("--epochs", type=positive_int, help=f"[{DEMO['epochs']}]")
    p.add_argument("--batch-size", type=positive_int, help=f"[{DEMO['batch_size']}]")
    p.add_argument("--img-size", type=positive_int, help=f"[{DEMO['img_size']}]")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--data-root", help="Fashion-MNIST location [$MICRONET_TORCH_HOME/data, from Debian's files]")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--fresh", action="store_true", help="start over instead of continuing the run in --output")
    p.set_defaults(func=_run)
