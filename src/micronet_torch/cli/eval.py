"""``micronet eval``: top-1, top-5, loss and count of a checkpoint over a class-folder tree or test split."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import nonnegative_int, positive_int


def run_eval(args: argparse.Namespace) -> int:
    from ..tools.evaluate import evaluate_checkpoint  # heavy: torch, and a runtime for exported files

    out = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        model=args.model,
        img_size=args.img_size,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        device=args.device or "auto",
        data_root=args.data_root,
        download=args.download,
        skip_bad_images=args.skip_bad_images,
    )
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['model']} on {out['data']}: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  "
            f"loss {out['loss']:.4f}  n {out['n']}  ({out['img_size']} px)"
        )
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (read from training checkpoints when left out)")
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        help="best.pt/last.pt, .pth(.tar), .pdparams, .safetensors, or an exported .onnx/.xml/.pte/.tflite/.param",
    )
    p.add_argument(
        "--data", default="fashion-mnist", help="class-folder tree (DIR/val when present) or a built-in test split"
    )
    p.add_argument("--img-size", type=positive_int, help="input size [the checkpoint's; 224 for published weights]")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, loss, n, ...)")
    p.add_argument("--batch-size", "-b", type=positive_int, default=256)
    p.add_argument("--workers", "-j", type=nonnegative_int)
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true")
    p.add_argument("--skip-bad-images", action="store_true")


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="top-1/top-5 of a checkpoint on a folder or test split",
        description="Top-1, top-5, loss and count of a checkpoint over a class-folder tree or test split.",
    )
    add_eval_args(p)
    p.set_defaults(func=run_eval)
