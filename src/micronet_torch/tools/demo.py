"""The demo, the README's main job. Train MicroNet-M0 on Fashion-MNIST, evaluate it, predict a few
test images, and say where everything is. Settings were measured to finish in minutes on 2 CPU cores.

Re-running continues (or reuses) the run in ``--output``; ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from ..data import build_eval_loader, load_builtin
from ..models import load_model
from ..train import Interrupted, TrainConfig, evaluate, train
from ..train.recipes import DEMO
from .predict import format_predictions, predict_images

# measured on 2 CPU cores (docs/training.md): ~90 % test top-1 in about 5 minutes


def write_samples(data_root: str | None, out: Path, n: int = 6) -> list[tuple[str, str]]:
    """Save the first ``n`` Fashion-MNIST test images as PNG files; returns (path, true class)."""
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


def run_demo(
    output: str = "runs/demo",
    epochs: int | None = None,
    batch_size: int | None = None,
    img_size: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    data_root: str | None = None,
    seed: int = 0,
    fresh: bool = False,
) -> int:
    """Train (or continue) the demo run in ``output``, evaluate its ``best.pt``, predict sample images."""
    t0 = time.perf_counter()
    out = Path(output)
    cfg = TrainConfig(
        model=DEMO["model"],
        data=DEMO["data"],
        output=str(out),
        img_size=img_size or DEMO["img_size"],
        batch_size=batch_size or DEMO["batch_size"],
        epochs=epochs or DEMO["epochs"],
        device=device or "auto",
        threads=threads,
        data_root=data_root,
        seed=seed,
    )
    print("== 1/3 train ==", flush=True)
    try:
        summary = train(cfg, resume=None if fresh else "auto", overwrite=True, resume_if_present=True)
    except Interrupted as stop:
        print(f"demo interrupted; run `micronet demo --output {out}` again to continue")
        return 128 + stop.signum
    train_s = time.perf_counter() - t0

    print("== 2/3 evaluate best.pt on the Fashion-MNIST test set ==", flush=True)
    device = torch.device("cpu") if cfg.device == "cpu" or not torch.cuda.is_available() else torch.device("cuda")
    loaded = load_model(out / "best.pt", device=device)
    loader, _, desc = build_eval_loader("fashion-mnist", loaded.data_config, 256, 0, data_root, device=device)
    result = evaluate(loaded.model, loader, loaded.data_config, device)
    result.update(model=loaded.name, checkpoint=str(out / "best.pt"), data=desc)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}  n {result['n']}")

    print("== 3/3 predict a few test images ==", flush=True)
    samples = write_samples(data_root, out / "samples")
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
