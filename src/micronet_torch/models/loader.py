"""The one way to load a checkpoint: any supported file in, the model plus what the file knows out.

Training checkpoints (``best.pt`` / ``last.pt``) carry their model, classes and evaluation transform, so a
model loaded from one sees images exactly as its training evaluation did. Published weights (``.pth.tar``,
PaddleClas ``.pdparams``) and ``.safetensors`` files get their metadata where they record it, else the
published evaluation transform (resize 256, centre crop 224, bilinear, ImageNet mean/std) at 224 px.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig, default_policy
from .registry import build_model, create_model, pretrained_cfg, resolve_name
from .weights import (
    CLASSIFIER_PREFIX,
    STEM_CONV_KEY,
    CheckpointError,
    CheckpointNotFound,
    checkpoint_metadata,
    guess_model,
    is_training_checkpoint,
    load_into,
    read_checkpoint,
    read_state_dict,
)


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
    from torchvision.models import ResNet18_Weights  # torchvision.models is slow to import; only needed here

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def published_data_config(img_size: int | None = None, in_chans: int = 3) -> DataConfig:
    """The published evaluation transform (timm's pretrained config) at ``img_size`` (default 224)."""
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


def canonical_name(name: str | None) -> str | None:
    """A MicroNet's registered name for ``name`` (aliases resolved), or ``name`` itself for other models."""
    if name is None:
        return None
    try:
        return resolve_name(name)[0].name
    except ValueError:
        build_model(name, num_classes=2)  # a baseline / timm model, or the 'unknown model' error
        return name


def load_model(
    checkpoint: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
) -> LoadedModel:
    """Build the model a checkpoint holds, in eval mode on ``device``.

    ``model_name`` must match a training checkpoint's model; for other files it names the model
    (else the file's metadata, else the best-matching architecture, is used). ``num_classes`` replaces
    the head (fine-tuning, conversion); the default keeps the file's.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    wanted = canonical_name(model_name)
    obj = read_checkpoint(path) if path.suffix not in (".pdparams", ".safetensors") else None
    if obj is not None and is_training_checkpoint(obj):
        loaded = _from_training_checkpoint(path, obj, wanted, img_size)
    else:
        loaded = _from_weights(path, wanted, img_size)
    if num_classes is not None and getattr(loaded.model, "num_classes", num_classes) != num_classes:
        loaded.model.reset_classifier(num_classes)
        loaded.class_names = [f"class_{i}" for i in range(num_classes)]
    loaded.model.to(device).eval()
    return loaded


def _from_training_checkpoint(path: Path, obj: dict[str, Any], wanted: str | None, img_size: int | None) -> LoadedModel:
    name = str(obj["model_name"])
    if wanted and wanted != name:
        raise CheckpointError(
            f"--checkpoint {path} holds a {name} (trained by micronet train), not {wanted}; use --model {name}"
        )
    dcfg = DataConfig.from_dict(obj.get("data_config") or {"img_size": obj["img_size"], "in_chans": obj["in_chans"]})
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
        raise CheckpointError(f"--checkpoint {path}: its weights do not fit {name}: {str(err)[:500]}") from err
    class_names = [str(c) for c in obj["class_names"]]
    info = {k: obj.get(k) for k in ("epoch", "best_top1", "model_source") if k in obj}
    return LoadedModel(model, name, dcfg, class_names, "training", info)


def _from_weights(path: Path, wanted: str | None, img_size: int | None) -> LoadedModel:
    sd = read_state_dict(path)
    meta = checkpoint_metadata(path)
    name = wanted
    if name is None:
        for key in ("model_name", "model", "arch"):
            try:
                name = canonical_name(str(meta[key])) if key in meta else None
            except ValueError:
                name = None
            if name:
                break
    name = name or guess_model(sd)
    if name is None:
        raise CheckpointError(f"cannot tell which model {path} holds; pass --model (one of: micronet models)")
    head = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    n_cls = int(head.shape[0]) if head is not None else 1000
    in_chans = int(sd[STEM_CONV_KEY].shape[1]) if STEM_CONV_KEY in sd else 3
    model = create_model(name, num_classes=n_cls, in_chans=in_chans)
    load_into(model, sd, source=str(path))
    dcfg = published_data_config(img_size, in_chans)
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
    return LoadedModel(model, name, dcfg, class_names, "weights", {})
