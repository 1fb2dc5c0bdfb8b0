"""``micronet demo``: the README's main job. Train MicroNet-M0 on Fashion-MNIST, evaluate it, predict a few
test images, and say where everything is. Settings were measured to finish in minutes on 2 CPU cores.

Re-running continues (or reuses) the run in ``--output``; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

# measured on 2 CPU cores (docs/training.md): ~90 % test top-1 in about 5 minutes
DEMO = dict(model="micronet_m0", data="fashion-mnist", img_size=32, batch_size=128, epochs=12)


def write_samples(data_root: str | None, out: Path, n: int = 6) -> list[tuple[str, str]]:
    """Save the first ``n`` Fashion-MNIST test images as PNG files; returns (path, true class)."""
    from PIL import Image

    from .data import load_builtin

    d = load_builtin("fashion-mnist", data_root, download=False)
    x, y = d["val"]
    out.mkdir(parents=True, exist_ok=True)
    picked: list[tuple[str, str]] = []
    seen: set[int] = set()
    for i in range(len(y)):  # one image per class, for a varied sample
        label = int(y[i])
        if label in seen:
            continue
        seen.add(label)
        name = d["class_names"][label]
        path = out / f"test{i:05d}_{name.replace('/', '-').replace(' ', '_').lower()}.png"
        Image.fromarray(x[i, 0].numpy(), mode="L").save(path)
        picked.append((str(path), name))
        if len(picked) == n:
            break
    return picked


def run_demo(args: argparse.Namespace) -> int:
    from .data import build_eval_loader
    from .engine import Interrupted, TrainConfig, evaluate, train
    from .evaluate import load_for_inference
    from .predict import format_predictions, predict_images

    t0 = time.perf_counter()
    out = Path(args.output)
    cfg = TrainConfig(
        model=DEMO["model"],
        data=DEMO["data"],
        output=str(out),
        img_size=args.img_size or DEMO["img_size"],
        batch_size=args.batch_size or DEMO["batch_size"],
        epochs=args.epochs or DEMO["epochs"],
        device=args.device or "auto",
        threads=args.threads,
        data_root=args.data_root,
        seed=args.seed,
    )
    print("== 1/3 train ==", flush=True)
    try:
        summary = train(cfg, resume=None if args.fresh else "auto", overwrite=True, resume_if_present=True)
    except Interrupted as stop:
        print(f"demo interrupted; run `micronet demo --output {out}` again to continue")
        return 128 + stop.signum
    train_s = time.perf_counter() - t0

    print("== 2/3 evaluate best.pt on the Fashion-MNIST test set ==", flush=True)
    device = torch.device("cpu") if cfg.device == "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    loaded = load_for_inference(out / "best.pt", device=device)
    loader, _, desc = build_eval_loader("fashion-mnist", loaded.data_config, 256, 0, args.data_root, device=device)
    result = evaluate(loaded.model, loader, loaded.data_config, device)
    result.update(model=loaded.name, checkpoint=str(out / "best.pt"), data=desc)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}  n {result['n']}")

    print("== 3/3 predict a few test images ==", flush=True)
    samples = write_samples(args.data_root, out / "samples")
    preds = predict_images(loaded, [p for p, _ in samples], topk=3)
    print(format_predictions(preds))
    right = sum(p["top"][0]["class"] == truth for p, (_, truth) in zip(preds, samples, strict=True))
    print(f"{right}/{len(samples)} sample images classified correctly (true class in the file name)")

    total = time.perf_counter() - t0
    print(
        f"\ndone in {total / 60:.1f} min (training {train_s / 60:.1f} min): Fashion-MNIST test top-1 "
        f"{result['top1']:.2f} %\nresults in {out}/:\n"
        f"  best.pt, last.pt     checkpoints (micronet eval / predict --checkpoint {out}/best.pt)\n"
        f"  summary.json         best/final top-1, throughput; eval.json: the evaluation above\n"
        f"  metrics.csv, curves.png, tensorboard/   per-epoch metrics (tensorboard --logdir {out}/tensorboard)\n"
        f"  samples/             the images predicted above"
    )
    return 0 if summary is not None else 1


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train MicroNet-M0 on Fashion-MNIST, evaluate, predict (the README's first command)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--output", "-o", default="runs/demo", help="run folder [runs/demo]")
    p.add_argument("--epochs", type=int, help=f"[{DEMO['epochs']}]")
    p.add_argument("--batch-size", type=int, help=f"[{DEMO['batch_size']}]")
    p.add_argument("--img-size", type=int, help=f"[{DEMO['img_size']}]")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--data-root", help="Fashion-MNIST location [$MICRONET_TORCH_HOME/data, from Debian's files]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="start over instead of continuing the run in --output")
    p.set_defaults(func=run_demo)
