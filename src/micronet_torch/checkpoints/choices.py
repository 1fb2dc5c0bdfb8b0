"""Which model a checkpoint is for: the name and keyword arguments it records, checked, or the model its tensors fit.

A training checkpoint names the model to build and the arguments to build it with. Passed on unchecked,
a file could make timm build anything it can build with any arguments (a ``checkpoint_path`` makes timm
open another file; an ``hf-hub:`` name downloads one). Only the names this package builds are accepted, and
only the MicroNet keywords with plain values; anything else is a ``CheckpointError``. A file that names no
model is matched to the registered MicroNet whose tensors (names and shapes) it fits best (``guess_model``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import timm
import torch

from ..models.baselines import MNV3_SMALL
from ..models.blocks import Variant
from ..models.micronet import MicroNet
from ..models.specs import MODEL_SPECS, PREPRINT_ALIASES
from .errors import CheckpointError

# the tensors of a MicroNet state dict that the loaders look at: the head (replaced for another class count,
# left out when matching a file to a model) and the stem (adapted to another number of input channels)
CLASSIFIER_PREFIX = "classifier.2."
STEM_CONV_KEY = "features.0.stem.0.conv.0.weight"
# the keywords create_model takes from a checkpoint (TrainConfig.model_kwargs, --drop-rate)
MODEL_KWARGS = frozenset({"drop_rate", "width", *(f.name for f in fields(Variant))})
_PLAIN = (str, int, float, bool, type(None))
_TIMM_NAME = re.compile(r"[A-Za-z0-9_.]{1,120}")  # no ':' (hf-hub:, local-dir:) and no '/'


def is_buildable_name(name: Any) -> bool:
    """Whether ``name`` is a MicroNet (or preprint alias), ``mobilenetv3_small_w<width>`` or a timm model name."""
    if type(name) is not str:
        return False
    key = name.lower().replace("-", "_")
    if key in MODEL_SPECS or key in PREPRINT_ALIASES or MNV3_SMALL.match(name):
        return True
    return bool(_TIMM_NAME.fullmatch(name)) and timm.is_model(name)


def check_model_choice(name: Any, kwargs: Any, source: str) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` from a checkpoint when both are ones this package builds; else ``CheckpointError``."""
    if not is_buildable_name(name):
        raise CheckpointError(
            f"{source}: names the model {str(name)[:80]!r}, which this package does not build (a MicroNet, "
            "mobilenetv3_small_w<width> or a timm model name); refusing the file"
        )
    if kwargs is None:
        return name, {}
    if type(kwargs) is not dict:
        raise CheckpointError(f"{source}: its model arguments are a {type(kwargs).__name__}, not a dict")
    unknown = sorted(str(k)[:40] for k in kwargs if k not in MODEL_KWARGS)
    if unknown:
        raise CheckpointError(
            f"{source}: sets model arguments {', '.join(unknown[:5])}, which this package never writes (known: "
            f"{', '.join(sorted(MODEL_KWARGS))}); refusing the file"
        )
    odd = sorted(k for k, v in kwargs.items() if type(v) not in _PLAIN or (type(v) is str and len(v) > 40))
    if odd:
        raise CheckpointError(f"{source}: model argument(s) {', '.join(odd)} are not plain values; refusing the file")
    return name, dict(kwargs)


def training_choice(obj: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]] | None:
    """The model name and arguments a PyTorch checkpoint records (and its saved config would build), checked;
    None when it names no model."""
    config = obj.get("config")
    if isinstance(config, Mapping) and ("model" in config or "model_kwargs" in config):
        check_model_choice(config.get("model"), config.get("model_kwargs"), f"{source} (its saved config)")
    if "model_name" in obj:
        return check_model_choice(obj["model_name"], obj.get("model_kwargs"), source)
    return None


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose backbone tensors (names and shapes) the state dict matches best."""
    theirs = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIX)}
    best, best_score = None, 0.0
    for name, spec in MODEL_SPECS.items():
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in MicroNet(spec).state_dict().items()}
        ours = {k: s for k, s in shapes.items() if not k.startswith(CLASSIFIER_PREFIX)}
        same = sum(1 for k, s in ours.items() if theirs.get(k) == s)
        score = same / max(len(ours), len(theirs))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def choose_model(
    wanted: str | None, metadata: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], source: str
) -> tuple[str, dict[str, Any]]:
    """The model to build for a weights file, and its arguments: ``wanted`` (``--model``), else the name its
    metadata records (when this package builds it), else the MicroNet its tensors fit. The recorded arguments
    (``metadata["model_kwargs"]``, decoded) are used, checked, only with the recorded model."""
    recorded = next(
        (str(metadata[k]) for k in ("model_name", "model", "arch") if k in metadata and is_buildable_name(metadata[k])),
        None,
    )
    name = wanted or recorded or guess_model(state_dict)
    if name is None:
        raise CheckpointError(f"cannot tell which model {source} holds; pass --model (one of: micronet models)")
    if "model_kwargs" in metadata and recorded is not None and _key(recorded) == _key(name):
        return check_model_choice(name, metadata["model_kwargs"], source)
    return name, {}


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


__all__ = [
    "CLASSIFIER_PREFIX",
    "MODEL_KWARGS",
    "STEM_CONV_KEY",
    "check_model_choice",
    "choose_model",
    "guess_model",
    "is_buildable_name",
    "training_choice",
]
