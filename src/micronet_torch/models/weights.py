"""Checkpoints from every source, loaded strictly: published ``.pth``, PaddleClas ``.pdparams``, our own files.

Every source is turned into a plain state dict named like this project's modules (which are the
published code's names), then loaded with every tensor used and every shape checked. Mismatches are
reported by key and shape, with the model the file most resembles.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from timm.models import adapt_input_conv
from torch import nn

from .._fs import atomic_write
from .micronet import MicroNet
from .specs import MODEL_SPECS

PathLike = str | os.PathLike

CLASSIFIER_PREFIX = "classifier.2."
STEM_CONV_KEY = "features.0.stem.0.conv.0.weight"
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# keys every training checkpoint (``micronet train``'s last.pt / best.pt) holds
TRAINING_KEYS = ("model", "model_name", "num_classes", "in_chans", "img_size", "class_names")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which and why."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (both a checkpoint error and a ``FileNotFoundError``)."""


# ---- reading ------------------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for PaddleClas ``.pdparams``: numpy arrays and dtypes only, anything else refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a .pdparams file holds only numpy arrays")
        if module.startswith("numpy.") and module.endswith("multiarray"):
            # numpy >= 2 moved numpy.core to numpy._core; serve both spellings from the one we have
            try:
                from numpy._core import multiarray
            except ImportError:  # numpy < 2
                from numpy.core import multiarray
            return multiarray._reconstruct
        return getattr(np, name)


def read_pdparams(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a PaddleClas ``.pdparams`` without Paddle and rename it to this project's (published) names.

    Paddle stores BatchNorm statistics as ``_mean``/``_variance``, keeps no ``num_batches_tracked``, and
    stores Linear weights as [in, out]; the only 2-D tensors in MicroNet are Linear weights.
    """
    with open(path, "rb") as fh:
        try:
            raw = _NumpyOnlyUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable PaddlePaddle .pdparams file ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict of arrays, found {type(raw).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key == "StructuredToParameterName@@":
            continue
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {key!r} is {type(value).__name__}, not an array")
        tensor = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
        if key.endswith("._mean"):
            key = key[: -len("_mean")] + "running_mean"
        elif key.endswith("._variance"):
            key = key[: -len("_variance")] + "running_var"
        elif key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.t().contiguous()
        out[key] = tensor
    return out


def _unwrap(obj: Any, path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (published, training or bare format)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict' or 'model')"
        )
    out = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A PyTorch checkpoint file as a dict, read with ``weights_only=True`` (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        reason = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise CheckpointError(
            f"checkpoint {path} is not readable: not a readable PyTorch checkpoint (truncated or another format), "
            f"or it holds objects other than tensors and plain containers, which this package refuses to unpickle "
            f"({reason[0][:300]})"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def is_training_checkpoint(obj: Mapping[str, Any]) -> bool:
    """True for this project's ``last.pt`` / ``best.pt`` (as opposed to published weights files)."""
    return all(k in obj for k in TRAINING_KEYS) and isinstance(obj.get("model"), Mapping)


def checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """What a file says about itself: the model name and class names, when it records them."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as fh:
                return dict(fh.metadata() or {})
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from err
    if path.suffix == ".pdparams":
        return {}
    obj = read_checkpoint(path)
    return {k: obj[k] for k in ("model_name", "arch", "num_classes", "class_names", "in_chans") if k in obj}


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint into a state dict with this project's names (no ``module.``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    if path.suffix == ".pdparams":
        return read_pdparams(path)
    if path.suffix == ".safetensors":
        try:
            return _unwrap(load_file(str(path)), path)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from err
    return _unwrap(read_checkpoint(path), path)


# ---- matching -----------------------------------------------------------------------------------
def _shapes_of(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MicroNet(MODEL_SPECS[name])
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered model whose backbone tensors (names and shapes) the state dict matches best."""
    theirs = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIX)}
    best, best_score = None, 0.0
    for name in MODEL_SPECS:
        ours = {k: s for k, s in _shapes_of(name).items() if not k.startswith(CLASSIFIER_PREFIX)}
        same = sum(1 for k, s in ours.items() if theirs.get(k) == s)
        score = same / max(len(ours), len(theirs))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.5 else None


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    return adapt_input_conv(in_chans, weight)


def load_into(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    num_classes: int | None = None,
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, then give it a ``num_classes`` head if that differs.

    Every tensor of the file must be used and every tensor of the model filled with the same shape;
    ``num_batches_tracked`` (absent from PaddleClas files) is the one exception, and a file without a
    classifier leaves the model's new head as initialised. The head first takes the file's class count
    so that its weights load; the stem is adapted when the model has another number of input channels.
    """
    sd = dict(state_dict)
    head_w = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    if head_w is not None and getattr(model, "num_classes", None) not in (None, head_w.shape[0]):
        model.reset_classifier(int(head_w.shape[0]))
    ours = model.state_dict()
    if STEM_CONV_KEY in sd and STEM_CONV_KEY in ours:
        theirs_w, ours_w = sd[STEM_CONV_KEY], ours[STEM_CONV_KEY]
        if theirs_w.shape[1] != ours_w.shape[1] and theirs_w.shape[0] == ours_w.shape[0]:
            sd[STEM_CONV_KEY] = _adapt_stem(theirs_w, ours_w.shape[1])
    file_has_head = any(k.startswith(CLASSIFIER_PREFIX) for k in sd)
    missing = [
        k
        for k in ours
        if k not in sd
        and not k.endswith("num_batches_tracked")
        and (file_has_head or not k.startswith(CLASSIFIER_PREFIX))
    ]
    unexpected = [k for k in sd if k not in ours]
    mismatched = [
        (k, tuple(sd[k].shape), tuple(v.shape)) for k, v in ours.items() if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
        lines = [f"{source} does not fit {name}"]
        guess = guess_model(sd)
        if guess and guess != name:
            lines[0] += f": it looks like a {guess} checkpoint (create that model instead)"
        for key, theirs, mine in mismatched[:8]:
            lines.append(f"  {key}: file has shape {list(theirs)}, the model needs {list(mine)}")
        if missing:
            lines.append(f"  {len(missing)} model tensors missing from the file, e.g. {', '.join(missing[:4])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} file tensors unknown to the model, e.g. {', '.join(unexpected[:4])}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=False)
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)
    return model


def save_safetensors(model_or_sd: nn.Module | Mapping[str, torch.Tensor], path: PathLike, model_name: str) -> Path:
    """Write a clean ``.safetensors`` (no ``module.`` prefix, no buffers that are not saved) atomically."""
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    head = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    meta = {"model": model_name, "format": "micronet-torch"}
    if head is not None:
        meta["num_classes"] = str(head.shape[0])
    payload = save(sd, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda out: out.write(payload))


__all__ = [
    "CheckpointError",
    "checkpoint_metadata",
    "guess_model",
    "is_training_checkpoint",
    "load_into",
    "read_checkpoint",
    "read_pdparams",
    "read_state_dict",
    "save_safetensors",
]
