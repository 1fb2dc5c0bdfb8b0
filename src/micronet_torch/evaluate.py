"""``micronet eval``: top-1, top-5, loss and count of a checkpoint over a class-folder tree or test split.

Training checkpoints (``best.pt``/``last.pt``) carry their model, classes and evaluation transform,
so evaluating one repeats exactly what training measured. Published weights (``.pth.tar``,
PaddleClas ``.pdparams``, ``.safetensors``) get the published evaluation transform (resize 256,
centre crop 224, bilinear, ImageNet mean/std) at 224 px, or the small-image one at 64 px or less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from .data import DataConfig, build_eval_loader, default_policy, default_workers

CLASSIFIER_KEY = "classifier.2.linear.0.weight"
STEM_KEY = "features.0.stem.0.conv.0.weight"


class EvalError(ValueError):
    """A checkpoint or data set that does not fit; the message says which and what to do."""


@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to see images as its training did."""

    model: nn.Module
    name: str
    data_config: DataConfig
    class_names: list[str]
    source: str  # 'training' (this project's last.pt/best.pt) or 'weights' (published/converted)
    info: dict[str, Any] = field(default_factory=dict)


def imagenet_class_names() -> list[str]:
    """ImageNet-1k class names in index order, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _published_config(img_size: int | None, in_chans: int) -> DataConfig:
    from .registry import pretrained_cfg

    pc = pretrained_cfg("micronet_m0")
    size = img_size or pc["input_size"][-1]
    return DataConfig(
        img_size=size,
        in_chans=in_chans,
        policy=default_policy(size),
        crop_pct=pc["crop_pct"],
        mean=tuple(pc["mean"]),
        std=tuple(pc["std"]),
    )


def _resolve_model_name(name: str | None) -> str | None:
    if name is None:
        return None
    from .registry import resolve_name

    try:
        return resolve_name(name)[0].name
    except ValueError:
        from .engine import build_model

        build_model(name, num_classes=2)  # a baseline / timm model, or the 'unknown model' error
        return name


def load_for_inference(
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Build the model a checkpoint holds, in eval mode on ``device``.

    ``model_name`` must match a training checkpoint's model; for other files it names the model
    (else the file's metadata, else the best-matching architecture, is used).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise EvalError(f"--checkpoint {path} does not exist")
    from .engine import build_model
    from .registry import create_model

    wanted = _resolve_model_name(model_name)
    obj = None
    if path.suffix not in (".pdparams", ".safetensors"):
        obj = ckpt.load(path)
    if obj is not None and ckpt.is_training_checkpoint(obj):
        name = str(obj["model_name"])
        if wanted and wanted != name:
            raise EvalError(
                f"--checkpoint {path} holds a {name} (trained by micronet train), not {wanted}; use --model {name}"
            )
        dcfg = DataConfig.from_dict(
            obj.get("data_config") or {"img_size": obj["img_size"], "in_chans": obj["in_chans"]}
        )
        if img_size and img_size != dcfg.img_size:
            print(
                f"note: {path} was trained and evaluated at {dcfg.img_size} px; evaluating at {img_size} px",
                file=sys.stderr,
            )
            dcfg.img_size, dcfg.policy = img_size, default_policy(img_size)
        model = build_model(
            name, num_classes=int(obj["num_classes"]), in_chans=int(obj["in_chans"]), **(obj.get("model_kwargs") or {})
        )
        try:
            model.load_state_dict(obj["model"])
        except RuntimeError as err:
            raise EvalError(f"--checkpoint {path}: its weights do not fit {name}: {str(err)[:500]}") from err
        class_names = [str(c) for c in obj["class_names"]]
        info = {k: obj.get(k) for k in ("epoch", "best_top1", "model_source") if k in obj}
        source = "training"
    else:
        from .weights import checkpoint_metadata, guess_model, load_into, read_state_dict

        sd = read_state_dict(path)
        meta = checkpoint_metadata(path) if path.suffix != ".pdparams" else {}
        name = wanted
        if name is None:
            for key in ("model_name", "model", "arch"):
                try:
                    name = _resolve_model_name(str(meta[key])) if key in meta else None
                except ValueError:
                    name = None
                if name:
                    break
        name = name or guess_model(sd)
        if name is None:
            raise EvalError(f"cannot tell which model {path} holds; pass --model (one of: micronet models)")
        head = sd.get(CLASSIFIER_KEY)
        n_cls = int(head.shape[0]) if head is not None else 1000
        in_chans = int(sd[STEM_KEY].shape[1]) if STEM_KEY in sd else 3
        model = create_model(name, num_classes=n_cls, in_chans=in_chans)
        load_into(model, sd, source=str(path))
        dcfg = _published_config(img_size, in_chans)
        names = meta.get("class_names")
        if isinstance(names, str):
            try:
                names = json.loads(names)
            except ValueError:
                names = None
        if names and len(names) == n_cls:
            class_names = [str(c) for c in names]
        elif n_cls == 1000:
            class_names = imagenet_class_names()
        else:
            class_names = [f"class_{i}" for i in range(n_cls)]
        info, source = {}, "weights"
    model.to(device).eval()
    return LoadedModel(model, name, dcfg, class_names, source, info)


def check_classes(loaded: LoadedModel, data_classes: list[str], data: str) -> None:
    """The data's classes must be the checkpoint's: same count, and the same names for our checkpoints."""
    n_model, n_data = len(loaded.class_names), len(data_classes)
    if n_model != n_data:
        raise EvalError(
            f"the checkpoint's model has {n_model} classes but {data} has {n_data}; evaluate it on data "
            "with the classes it was trained on (or fine-tune it with micronet train --pretrained)"
        )
    if loaded.source == "training" and list(loaded.class_names) != list(data_classes):
        diff = [(a, b) for a, b in zip(loaded.class_names, data_classes, strict=True) if a != b][:3]
        raise EvalError(
            f"the checkpoint's classes differ from those of {data}, e.g. "
            + ", ".join(f"{a!r} vs {b!r}" for a, b in diff)
            + "; class folders must be named as in training"
        )


def run_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate, pick_device

    device = pick_device(args.device or "auto")
    from .engine import default_threads

    loaded = load_for_inference(args.checkpoint, args.model, args.img_size, device)
    torch.set_num_threads(args.threads or default_threads(loaded.data_config.img_size))
    workers = args.workers if args.workers is not None else default_workers()
    loader, data_classes, desc = build_eval_loader(
        args.data,
        loaded.data_config,
        args.batch_size,
        workers,
        data_root=args.data_root,
        download=args.download,
        skip_bad=args.skip_bad_images,
        device=device,
    )
    check_classes(loaded, data_classes, args.data)
    result = evaluate(loaded.model, loader, loaded.data_config, device)
    skipped = getattr(loader, "skipped", 0)
    out = {
        "top1": result["top1"],
        "top5": result["top5"],
        "loss": result["loss"],
        "n": result["n"],
        "model": loaded.name,
        "checkpoint": str(args.checkpoint),
        "data": desc,
        "img_size": loaded.data_config.img_size,
        "skipped": skipped,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{loaded.name} on {desc}: top-1 {out['top1']:.2f}  top-5 {out['top5']:.2f}  "
            f"loss {out['loss']:.4f}  n {out['n']}  ({loaded.data_config.img_size} px)"
        )
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model name (read from training checkpoints when left out)")
    p.add_argument("--checkpoint", "-c", required=True, help="best.pt / last.pt, .pth(.tar), .pdparams, .safetensors")
    p.add_argument(
        "--data", default="fashion-mnist", help="class-folder tree (DIR/val when present) or a built-in test split"
    )
    p.add_argument("--img-size", type=int, help="input size [the checkpoint's; 224 for published weights]")
    p.add_argument("--json", action="store_true", help="print one JSON object (top1, top5, loss, n, ...)")
    p.add_argument("--batch-size", "-b", type=int, default=256)
    p.add_argument("--workers", "-j", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="auto, cpu, cuda [auto]")
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true")
    p.add_argument("--skip-bad-images", action="store_true")


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5 of a checkpoint on a folder or test split", description=__doc__.splitlines()[0]
    )
    add_eval_args(p)
    p.set_defaults(func=run_eval)
