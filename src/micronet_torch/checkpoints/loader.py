"""The one way to load a checkpoint: any supported file in, the model plus what the file knows out.

Training checkpoints (``best.pt`` / ``last.pt``) carry their model, classes and evaluation transform, so a
model loaded from one sees images exactly as its training evaluation did; so do the ``.safetensors`` files
``micronet convert`` writes (the same facts in their metadata). Published weights (``.pth.tar``, PaddleClas
``.pdparams``) and other ``.safetensors`` files get the published evaluation transform (resize 256, centre
crop 224, bilinear, ImageNet mean/std), with a one-line note saying it was assumed.

The path of one load, each module entered once: ``readers.open_checkpoint`` (the bytes through
``files.read_file_bounded``, the format by ``formats.sniff``, the content by ``READERS[format]``: ``torch.load``,
the ``pdparams`` unpickler or safetensors; a training checkpoint's model checked by ``choices``), then for a
weights file ``state_dict.state_dict_of`` (the format's key map) and ``choices.choose_model`` (which model),
``models.registry.create_model`` (build) and ``strict.load_into``; for a training checkpoint
``state_dict.check_tensors``, ``create_model`` and ``load_state_dict``. Everything a file says that chooses code
or sizes (model name, arguments, preprocessing) is checked before it is used.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.config import DataConfig, default_policy
from ..models.registry import create_model, pretrained_cfg, resolve_name
from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY, choose_model
from .errors import CheckpointError, CheckpointNotFound, one_line
from .readers import Checkpoint, open_checkpoint
from .state_dict import check_tensors, read_state_dict, state_dict_of
from .strict import load_into

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "LoadedModel",
    "canonical_name",
    "imagenet_class_names",
    "load_model",
    "parse_plain_json",
    "published_data_config",
    "read_state_dict",
]


@dataclass
class LoadedModel:
    """A model ready for inference with what it needs to see images as its training did."""

    model: nn.Module
    name: str
    data_config: DataConfig
    class_names: list[str]
    source: str  # 'training' (this project's last.pt/best.pt) or 'weights' (published/converted)
    info: dict[str, Any] = field(default_factory=dict)  # a --qat run's int8 graph: "qat_state" (deploy.qat)
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def imagenet_class_names() -> list[str]:
    """ImageNet-1k class names in index order, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights  # torchvision.models is slow to import; only needed here

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def published_data_config(
    img_size: int | None = None, in_chans: int = 3, cfg: Mapping[str, Any] | None = None
) -> DataConfig:
    """The published evaluation transform (timm's pretrained config, or a built model's ``cfg``) at ``img_size``
    (default 224)."""
    pc = cfg or pretrained_cfg("micronet_m0")
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
        create_model(name, num_classes=2)  # a baseline / timm model, or the 'unknown model' error
        return name


def parse_plain_json(text: str) -> Any:
    """``json.loads`` for a metadata value; None when it is not JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


JSON_METADATA = ("data_config", "class_names", "model_kwargs")  # string values that hold JSON (``save_safetensors``)


def _decoded(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A file's metadata with the JSON strings ``save_safetensors`` writes decoded (None when they are not JSON)."""
    return {k: parse_plain_json(v) if k in JSON_METADATA and isinstance(v, str) else v for k, v in meta.items()}


def _built_name(model: nn.Module, name: str) -> str:
    """The registered name of a built MicroNet (a preprint alias resolved), else the name it was built from."""
    spec = getattr(model, "spec", None)
    return spec.name if spec is not None else name


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
    ck = open_checkpoint(checkpoint)
    if ck.training and ck.model_choice is not None:
        loaded = _from_training_checkpoint(ck, model_name, img_size)
    else:
        loaded = _from_weights(ck, model_name, img_size)
    if num_classes is not None and getattr(loaded.model, "num_classes", num_classes) != num_classes:
        loaded.model.reset_classifier(num_classes)
        loaded.class_names = [f"class_{i}" for i in range(num_classes)]
    loaded.model.to(device).eval()
    return loaded


def _data_config(raw: Any, path: Path) -> DataConfig:
    """A recorded preprocessing dict as a checked ``DataConfig``; a bad one is the file's fault."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its recorded preprocessing is a {type(raw).__name__}, not a dict")
    try:
        return DataConfig.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its recorded preprocessing is not usable ({one_line(err, 200)})") from err


def _build(name: str, path: Path, what: str, **kwargs: Any) -> nn.Module:
    try:
        return create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build {what} ({one_line(err, 200)})") from err


def _tensors(entry: Any, error: str, ck: Checkpoint) -> dict[str, torch.Tensor]:
    """A checkpoint entry that must be a state dict: a dict of tensors within the file's limits, else ``error``."""
    if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
        raise CheckpointError(error)
    check_tensors(entry, str(ck.path), ck.limits.file)
    return entry


def _from_training_checkpoint(ck: Checkpoint, model_name: str | None, img_size: int | None) -> LoadedModel:
    path, obj = ck.path, ck.content
    name, kwargs = ck.model_choice
    wanted = canonical_name(model_name)
    if wanted and wanted != name:
        raise CheckpointError(
            f"--checkpoint {path} holds a {name} (trained by micronet train), not {wanted}; use --model {name}"
        )
    try:
        n_cls, in_chans = int(obj["num_classes"]), int(obj["in_chans"])
        class_names = [str(c) for c in obj["class_names"]]
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its class count, channels or class names are not valid") from err
    if not 0 < n_cls <= 1_000_000 or not 0 < in_chans <= 64 or len(class_names) != n_cls:
        raise CheckpointError(f"{path}: records {n_cls} classes ({len(class_names)} names) and {in_chans} channels")
    dcfg = _data_config(obj.get("data_config") or {"img_size": obj["img_size"], "in_chans": in_chans}, path)
    if img_size and img_size != dcfg.img_size:
        print(
            f"note: {path} was trained and evaluated at {dcfg.img_size} px; evaluating at {img_size} px",
            file=sys.stderr,
        )
        dcfg.img_size, dcfg.policy = img_size, default_policy(img_size)
    state = _tensors(obj["model"], f"{path}: its 'model' entry is not a dict of tensors", ck)
    info: dict[str, Any] = {}
    config = obj.get("config")
    if isinstance(config, dict) and config.get("qat") is True:  # a --qat run: model = its int8 graph
        lacks = f"{path}: a --qat checkpoint without the float model it started from"
        info["qat_state"], state = state, _tensors(obj.get("float_model"), lacks, ck)
    model = _build(name, path, f"the {name} it names", num_classes=n_cls, in_chans=in_chans, **kwargs)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"--checkpoint {path}: its weights do not fit {name}: {one_line(err, 500)}") from err
    info.update({k: obj.get(k) for k in ("epoch", "best_top1", "model_source") if k in obj})
    return LoadedModel(model, name, dcfg, class_names, "training", info, kwargs)


def _from_weights(ck: Checkpoint, model_name: str | None, img_size: int | None) -> LoadedModel:
    path = ck.path
    sd = state_dict_of(ck)
    meta = _decoded(ck.metadata)
    name, kwargs = choose_model(model_name, meta, sd, str(path))
    head = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    n_cls = int(head.shape[0]) if head is not None else 1000
    in_chans = int(sd[STEM_CONV_KEY].shape[1]) if STEM_CONV_KEY in sd else 3
    model = _build(name, path, name, num_classes=n_cls, in_chans=in_chans, **kwargs)
    load_into(model, sd, source=str(path))
    dcfg = _recorded_or_published(meta, model, path, img_size, in_chans)
    names = meta.get("class_names")
    if isinstance(names, list) and len(names) == n_cls:
        class_names = [str(c) for c in names]
    elif n_cls == 1000:
        class_names = imagenet_class_names()
    else:
        class_names = [f"class_{i}" for i in range(n_cls)]
    return LoadedModel(model, _built_name(model, name), dcfg, class_names, "weights", {}, kwargs)


def _recorded_or_published(
    meta: dict[str, Any], model: nn.Module, path: Path, img_size: int | None, in_chans: int
) -> DataConfig:
    """The preprocessing a file records (``micronet convert`` writes it), else the published one, with a note."""
    raw = meta.get("data_config")
    if raw is not None:
        dcfg = _data_config(raw, path)
        if img_size and img_size != dcfg.img_size:
            print(f"note: {path} records {dcfg.img_size} px; evaluating at {img_size} px", file=sys.stderr)
            dcfg.img_size, dcfg.policy = img_size, default_policy(img_size)
        return dcfg
    cfg = getattr(model, "pretrained_cfg", None) if hasattr(model, "spec") else None  # a MicroNet's, as built
    dcfg = published_data_config(img_size, in_chans, cfg)
    size = f"{img_size} px (--img-size)" if img_size else f"{dcfg.img_size} px"
    print(
        f"note: {path} records no preprocessing; assuming the published ImageNet transform: {size}, "
        f"{dcfg.policy} policy, ImageNet mean/std (pass --img-size if it was trained at another size)",
        file=sys.stderr,
    )
    return dcfg
