"""``micronet predict``: the top-k classes, with probabilities, of each image given (``tools.predict``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from .._env import default_threads, pick_device
from ..models import load_model
from ..tools.predict import format_predictions, predict_images


def run_predict(args: argparse.Namespace) -> int:
    loaded = load_model(args.checkpoint, args.model, args.img_size, pick_device(args.device or "auto"))
    torch.set_num_threads(args.threads or default_threads(loaded.data_config.img_size))
    results = predict_images(loaded, args.images, args.topk)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-5 classes of images with a checkpoint",
        description="The top-k classes, with probabilities, of each image given.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", "-c", required=True, help="best.pt / last.pt, .pth(.tar), .pdparams, .safetensors")
    p.add_argument("--model", help="model name (read from training checkpoints when left out)")
    p.add_argument("--topk", "-k", type=int, default=5)
    p.add_argument("--img-size", type=int, help="input size [the checkpoint's]")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=run_predict)
