"""A read checkpoint → a checked state dict named like this project's modules (the published code's names).

Each source's key map is a timm-style filter function ``fn(state_dict, model) -> state_dict``:
``published_filter_fn`` unwraps the published ``{'state_dict': ...}`` layout (and this project's training
checkpoints) and strips ``module.`` / ``_orig_mod.``; ``paddleclas_filter_fn`` renames PaddlePaddle's
BatchNorm statistics and transposes its Linear weights. ``FILTERS`` picks one by the checkpoint's format;
``checkpoint_filter_fn`` picks one by the keys, for a state dict of unknown origin (timm's
``pretrained_filter_fn``). ``check_tensors`` then refuses tensors no MicroNet file holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY
from .errors import CheckpointError
from .files import MAX_BYTES_ENV, file_limit, max_checkpoint_bytes, read_file_bounded
from .pdparams import unpickle_pdparams
from .readers import Checkpoint, open_checkpoint

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]

STRIP_PREFIXES = ("module.", "_orig_mod.")
WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
TENSOR_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16}
    | {torch.int32, torch.int64, torch.bool}
)


# ---- the key maps -------------------------------------------------------------------------------
def published_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module | None = None, *, source: str = "checkpoint"
) -> StateDict:
    """The published code's ``.pth.tar`` (and this project's ``.pt``): the tensors under ``state_dict`` /
    ``model`` / ``model_ema``, or the dict itself, without the ``module.`` (DDP) and ``_orig_mod.`` prefixes."""
    obj: Any = state_dict
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{source}: no state dict found (expected a dict of tensors, or one under 'state_dict' or 'model')"
        )
    out = {}
    for key, value in obj.items():
        key = str(key)
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def paddleclas_filter_fn(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None, *, source: str = "checkpoint"
) -> StateDict:
    """PaddleClas's names → the published code's: BatchNorm ``_mean`` / ``_variance`` become ``running_mean`` /
    ``running_var``, and Linear weights (Paddle stores them [in, out]; MicroNet's only 2-D tensors) are
    transposed."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("._mean"):
            key = key[: -len("_mean")] + "running_mean"
        elif key.endswith("._variance"):
            key = key[: -len("_variance")] + "running_var"
        elif key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.t().contiguous()
        out[key] = tensor
    return out


def _same(state_dict: Mapping[str, torch.Tensor], model: nn.Module | None = None, *, source: str = "") -> StateDict:
    return dict(state_dict)


# a checkpoint's format -> the key map of the files of that format
FILTERS: dict[str, Callable[..., StateDict]] = {
    "torch": published_filter_fn,
    "pdparams": paddleclas_filter_fn,
    "safetensors": _same,  # written by this project (or by timm tools): already the published names
}


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module | None = None, *, source: str = "checkpoint"
) -> StateDict:
    """timm's ``checkpoint_filter_fn`` for MicroNet: any published, PaddleClas or own state dict → our names."""
    if any(str(k).endswith(("._mean", "._variance")) for k in state_dict):
        return paddleclas_filter_fn(state_dict, model, source=source)
    return published_filter_fn(state_dict, model, source=source)


# ---- checks -------------------------------------------------------------------------------------
def check_tensors(sd: Mapping[str, torch.Tensor], source: str, limit: int | None = None) -> None:
    """Refuse tensors no MicroNet file holds: other layouts or dtypes, sizes past the limit, wrong-rank stems.

    A stride-0 tensor of a billion elements costs a few bytes of file and gigabytes once copied; the
    logical size of all tensors together is bounded by the checkpoint size limit.
    """
    budget = file_limit() if limit is None else limit
    for key, value in sd.items():
        name = repr(key[:80])
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            raise CheckpointError(f"{source}: tensor {name} is not a plain dense tensor")
        if value.dtype not in TENSOR_DTYPES:
            raise CheckpointError(f"{source}: tensor {name} has dtype {value.dtype}, not one weights are stored in")
        budget -= value.numel() * value.element_size()
        if budget < 0:
            raise CheckpointError(
                f"{source}: tensor {name} (shape {list(value.shape)[:8]}) takes the tensors past the size limit "
                f"(see {MAX_BYTES_ENV})"
            )
    for key, rank in ((STEM_CONV_KEY, 4), (CLASSIFIER_PREFIX + "linear.0.weight", 2)):
        if key in sd and sd[key].ndim != rank:
            raise CheckpointError(f"{source}: tensor {key} has {sd[key].ndim} dimensions, a MicroNet's has {rank}")


def state_dict_of(ck: Checkpoint, model: nn.Module | None = None) -> StateDict:
    """The checked state dict of a read checkpoint, with this project's names (its format's filter applied)."""
    sd = FILTERS[ck.format](ck.content, model, source=str(ck.path))
    check_tensors(sd, str(ck.path), ck.limits.file)
    return sd


def metadata_of(ck: Checkpoint) -> dict[str, Any]:
    """What a read checkpoint says about itself: the model name and class names, when it records them."""
    return dict(ck.metadata)


# ---- a file in one call -------------------------------------------------------------------------
def read_state_dict(path: PathLike) -> StateDict:
    """Read any supported checkpoint into a checked state dict with this project's names (no ``module.``)."""
    return state_dict_of(open_checkpoint(path))


def checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """What a file says about itself: the model name and class names, when it records them."""
    return metadata_of(open_checkpoint(path))


def pdparams_from_bytes(data: bytes, source: str = "<bytes>", max_bytes: int | None = None) -> StateDict:
    """A PaddleClas ``.pdparams`` already in memory → float32 tensors with the published code's names."""
    return paddleclas_filter_fn(unpickle_pdparams(data, source, max_checkpoint_bytes(max_bytes)), source=source)


def read_pdparams(path: PathLike, max_bytes: int | None = None) -> StateDict:
    """Read a PaddleClas ``.pdparams`` into float32 tensors with this project's (the published code's) names.

    ``max_bytes`` bounds the file and the tensors made from it (default: ``$MICRONET_MAX_CHECKPOINT_BYTES``,
    else ``files.DEFAULT_MAX_BYTES``). Every failure raises ``CheckpointError`` with a one-line reason.
    """
    limit = max_checkpoint_bytes(max_bytes)
    return pdparams_from_bytes(read_file_bounded(path, limit, ".pdparams"), str(Path(path)), limit)


__all__ = [
    "CLASSIFIER_PREFIX",
    "FILTERS",
    "STEM_CONV_KEY",
    "check_tensors",
    "checkpoint_filter_fn",
    "checkpoint_metadata",
    "metadata_of",
    "paddleclas_filter_fn",
    "pdparams_from_bytes",
    "published_filter_fn",
    "read_pdparams",
    "read_state_dict",
    "state_dict_of",
]
