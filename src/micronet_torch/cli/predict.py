"""``micronet predict``: the top-k classes, with probabilities, of each image given (``tools.predict``).

Every readable image is printed; each unreadable or missing one is reported in one line and the exit status
is 2 when any failed (0 with ``--skip-bad-images``, which reports them as skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import positive_int


def run_predict(args: argparse.Namespace) -> int:
    import torch  # heavy: only when predicting

    from .._env import default_threads, pick_device
    from ..tools.evaluate import open_model
    from ..tools.predict import format_errors, format_predictions, predict_images

    loaded = open_model(
        args.checkpoint, args.model, args.img_size, pick_device(args.device or "auto"), args.threads or 1
    )
    torch.set_num_threads(args.threads or default_threads(loaded.data_config.img_size))
    results = predict_images(loaded, args.images, args.topk)
    errors = format_errors(results)
    if args.json:
        print(json.dumps(results, indent=2))
    elif any("top" in r for r in results):
        print(format_predictions(results))
    word = "skipped" if args.skip_bad_images else "error"
    for line in errors:
        print(f"micronet predict: {word}: {line}", file=sys.stderr)
    if errors and not args.skip_bad_images:
        good = sum("top" in r for r in results)
        print(f"micronet predict: {len(errors)} of {good + len(errors)} image(s) failed", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="top-5 classes of images with a checkpoint or an exported file",
        description="The top-k classes, with probabilities, of each image given (files, folders, glob patterns). "
        "Unreadable images are reported one per line; the exit status is 2 if any failed.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (images under them) or globs")
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        help="best.pt/last.pt, .pth(.tar), .pdparams, .safetensors, or an exported .onnx/.xml/.pte/.tflite/.param",
    )
    p.add_argument("--model", help="model name (read from training checkpoints when left out)")
    p.add_argument("--topk", "-k", type=positive_int, default=5)
    p.add_argument("--img-size", type=positive_int, help="input size [the checkpoint's]")
    p.add_argument("--json", action="store_true", help="print one JSON list (bad images as {image, error})")
    p.add_argument("--skip-bad-images", action="store_true", help="report unreadable images as skipped, exit 0")
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--threads", type=positive_int)
    p.set_defaults(func=run_predict)
