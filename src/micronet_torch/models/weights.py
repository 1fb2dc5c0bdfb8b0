"""Checkpoints from every source, loaded strictly: published ``.pth``, PaddleClas ``.pdparams``, our own files.

Every source is turned into a plain state dict named like this project's modules (which are the
published code's names), then loaded with every tensor used and every shape checked. Mismatches are
reported by key and shape, with the model the file most resembles.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save
from timm.models import adapt_input_conv
from torch import nn

from .._fs import atomic_write
from .choices import check_model_choice
from .errors import CheckpointError, CheckpointNotFound, one_line
from .formats import check_safetensors, describe, sniff
from .micronet import MicroNet
from .pdparams import MAX_BYTES_ENV, max_checkpoint_bytes, pdparams_from_bytes, read_file_bounded, read_pdparams
from .specs import MODEL_SPECS

PathLike = str | os.PathLike

CLASSIFIER_PREFIX = "classifier.2."
STEM_CONV_KEY = "features.0.stem.0.conv.0.weight"
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# keys every training checkpoint (``micronet train``'s last.pt / best.pt) holds
TRAINING_KEYS = ("model", "model_name", "num_classes", "in_chans", "img_size", "class_names")


# ---- reading ------------------------------------------------------------------------------------
# PyTorch files hold a whole training state (model, EMA, optimiser) and timm models can be large: a wider
# bound than a .pdparams's, unless MICRONET_MAX_CHECKPOINT_BYTES sets one for every format
DEFAULT_MAX_TORCH_BYTES = 2 * 1024**3
_TENSOR_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16}
    | {torch.int32, torch.int64, torch.bool}
)


@dataclass
class CheckpointFile:
    """A checkpoint read once: its format (``torch``, ``pdparams``, ``safetensors``), content and metadata.

    ``content`` is the dict ``torch.load`` returned for a PyTorch file, the state dict for the others;
    ``metadata`` is a ``.safetensors`` file's string map (empty for the other formats).
    """

    path: Path
    format: str
    content: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def _file_limit() -> int:
    return max_checkpoint_bytes() if os.environ.get(MAX_BYTES_ENV, "").strip() else DEFAULT_MAX_TORCH_BYTES


def _torch_reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (its advice to retry with weights_only=False is left out)."""
    text = str(err)
    found = re.search(r"Unsupported (global|operand)[^\n]*", text)
    if found:
        return one_line(found.group(0), 200)
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "torch.load" not in ln]
    return one_line(f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": "), 200)


def _read_torch(data: bytes, source: str) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about TorchScript archives and more
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler, zip reader and storage code raise many types; all mean unreadable
        what = describe(data) if data.startswith(b"PK") and b"data.pkl" not in data[:4096] else None
        if what:
            raise CheckpointError(
                f"{source}: not a checkpoint this package reads: {what} (not readable as a PyTorch checkpoint)"
            ) from err
        raise CheckpointError(
            f"{source}: not a readable PyTorch checkpoint (truncated, or it holds objects other than tensors and "
            f"plain containers, which this package refuses to unpickle): {_torch_reason(err)}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a dict of tensors")
    _bound_tensors(obj, source)
    return obj


def _bound_tensors(obj: Any, source: str) -> None:
    """Refuse a PyTorch file whose tensors (model, EMA, optimiser state alike) claim more than the size limit.

    A stored tensor's logical size is its storage's in any real file; a stride-0 view of a billion elements
    costs a few bytes of file and gigabytes once an optimiser or ``contiguous()`` copies it.
    """
    budget = _file_limit()
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 1_000_000:
            raise CheckpointError(f"{source}: holds more than a million objects; no checkpoint of this package does")
        if isinstance(item, torch.Tensor):
            budget -= item.numel() * item.element_size()
            if budget < 0:
                raise CheckpointError(
                    f"{source}: its tensors (one of shape {list(item.shape)[:8]}) claim more than the size limit "
                    f"(see {MAX_BYTES_ENV})"
                )
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _read_safetensors(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta = check_safetensors(data, source)
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{source}: not a readable .safetensors file ({one_line(err, 200)})") from err
    return tensors, meta


def _check_training_choices(obj: dict[str, Any], source: str) -> None:
    """The model name and arguments a training checkpoint (and its saved config) would build: known ones only."""
    if "model_name" in obj:
        check_model_choice(obj["model_name"], obj.get("model_kwargs"), source)
    config = obj.get("config")
    if isinstance(config, Mapping) and ("model" in config or "model_kwargs" in config):
        check_model_choice(config.get("model"), config.get("model_kwargs"), f"{source} (its saved config)")


def open_checkpoint(path: PathLike) -> CheckpointFile:
    """Read any supported checkpoint once, by its content (not its name); every failure is a CheckpointError.

    PyTorch files go through ``torch.load(weights_only=True)`` on the file's bytes, ``.pdparams`` through the
    numpy-free reader, ``.safetensors`` after its header is checked against the file's size. A training
    checkpoint's model name and arguments are checked (``choices.check_model_choice``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    data = read_file_bounded(path, _file_limit())
    source = str(path)
    kind = sniff(data)
    if kind == "torch":
        obj = _read_torch(data, source)
        _check_training_choices(obj, source)
        return CheckpointFile(path, "torch", obj)
    if kind == "safetensors":
        tensors, meta = _read_safetensors(data, source)
        return CheckpointFile(path, "safetensors", tensors, meta)
    if kind == "pickle":
        return CheckpointFile(path, "pdparams", pdparams_from_bytes(data, source, max_checkpoint_bytes()))
    raise CheckpointError(f"{source}: not a checkpoint this package reads: {describe(data, path.suffix)}")


def _unwrap(obj: Any, path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (published, training or bare format)."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: no state dict found (expected a dict of tensors, or one under 'state_dict' or 'model')"
        )
    out = {}
    for key, value in obj.items():
        key = str(key)
        for prefix in _STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def check_tensors(sd: Mapping[str, torch.Tensor], source: str, limit: int | None = None) -> None:
    """Refuse tensors no MicroNet file holds: other layouts or dtypes, sizes past the limit, wrong-rank stems.

    A stride-0 tensor of a billion elements costs a few bytes of file and gigabytes once copied; the
    logical size of all tensors together is bounded by the checkpoint size limit.
    """
    budget = _file_limit() if limit is None else limit
    for key, value in sd.items():
        name = repr(key[:80])
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
            raise CheckpointError(f"{source}: tensor {name} is not a plain dense tensor")
        if value.dtype not in _TENSOR_DTYPES:
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


def state_dict_of(ck: CheckpointFile) -> dict[str, torch.Tensor]:
    """The checked state dict of a read checkpoint, with this project's names (no ``module.``)."""
    sd = _unwrap(ck.content, ck.path) if ck.format == "torch" else dict(ck.content)
    check_tensors(sd, str(ck.path))
    return sd


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A PyTorch checkpoint file as a dict, read with ``weights_only=True`` (no pickled code runs)."""
    ck = open_checkpoint(path)
    if ck.format != "torch":
        raise CheckpointError(f"{path}: a {ck.format} weights file, not a PyTorch checkpoint (a .pt of micronet train)")
    return ck.content


def is_training_checkpoint(obj: Mapping[str, Any]) -> bool:
    """True for this project's ``last.pt`` / ``best.pt`` (as opposed to published weights files)."""
    return all(k in obj for k in TRAINING_KEYS) and isinstance(obj.get("model"), Mapping)


def metadata_of(ck: CheckpointFile) -> dict[str, Any]:
    """What a read checkpoint says about itself: the model name and class names, when it records them."""
    if ck.format == "safetensors":
        return dict(ck.metadata)
    if ck.format == "pdparams":
        return {}
    keys = ("model_name", "arch", "num_classes", "class_names", "in_chans")
    return {k: ck.content[k] for k in keys if k in ck.content}


def checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """What a file says about itself: the model name and class names, when it records them."""
    return metadata_of(open_checkpoint(path))


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint into a checked state dict with this project's names (no ``module.``)."""
    return state_dict_of(open_checkpoint(path))


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


def _misfit_message(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    """One line: which model the file does not fit, which model it looks like, the first differences."""
    name = getattr(getattr(model, "spec", None), "name", type(model).__name__)
    head = f"{source} does not fit {name}"
    guess = guess_model(sd)
    if guess and guess != name:
        head += f": it looks like a {guess} checkpoint (create that model instead: --model {guess})"
    parts = [f"{k}: file has shape {list(theirs)}, the model needs {list(mine)}" for k, theirs, mine in mismatched[:3]]
    if len(mismatched) > 3:
        parts.append(f"{len(mismatched) - 3} more shapes differ")
    if missing:
        parts.append(f"{len(missing)} model tensors missing from the file, e.g. {', '.join(missing[:3])}")
    if unexpected:
        shown = ", ".join(k[:80] for k in unexpected[:3])
        parts.append(f"{len(unexpected)} file tensors unknown to the model, e.g. {shown}")
    return one_line(f"{head}; {'; '.join(parts)}", 1200)


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
    if head_w is not None and head_w.ndim == 2 and getattr(model, "num_classes", None) not in (None, head_w.shape[0]):
        model.reset_classifier(int(head_w.shape[0]))
    ours = model.state_dict()
    if STEM_CONV_KEY in sd and STEM_CONV_KEY in ours:
        theirs_w, ours_w = sd[STEM_CONV_KEY], ours[STEM_CONV_KEY]
        same_rank = theirs_w.ndim == ours_w.ndim == 4
        if same_rank and theirs_w.shape[1] != ours_w.shape[1] and theirs_w.shape[0] == ours_w.shape[0]:
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
        raise CheckpointError(_misfit_message(model, sd, source, missing, unexpected, mismatched))
    model.load_state_dict(sd, strict=False)
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        model.reset_classifier(num_classes)
    return model


def save_safetensors(
    model_or_sd: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    model_name: str,
    *,
    data_config: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a clean ``.safetensors`` (no ``module.`` prefix, no buffers that are not saved) atomically.

    The metadata records what evaluating the weights needs besides them, so that ``load_model`` sees images
    as the original checkpoint did: the model and its arguments, the input size and preprocessing
    (``data_config``: ``DataConfig.to_dict()``), and the class names, each as JSON.
    """
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    head = sd.get(CLASSIFIER_PREFIX + "linear.0.weight")
    meta = {"model": model_name, "format": "micronet-torch"}
    if head is not None:
        meta["num_classes"] = str(head.shape[0])
    if STEM_CONV_KEY in sd:
        meta["in_chans"] = str(sd[STEM_CONV_KEY].shape[1])
    if data_config:
        meta["data_config"] = json.dumps(dict(data_config))
        meta["img_size"] = str(data_config.get("img_size", ""))
    if class_names:
        meta["class_names"] = json.dumps([str(c) for c in class_names])
    if model_kwargs:
        meta["model_kwargs"] = json.dumps(dict(model_kwargs))
    payload = save(sd, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda out: out.write(payload))


__all__ = [
    "CheckpointError",
    "CheckpointFile",
    "CheckpointNotFound",
    "check_tensors",
    "checkpoint_metadata",
    "guess_model",
    "is_training_checkpoint",
    "load_into",
    "metadata_of",
    "open_checkpoint",
    "read_checkpoint",
    "read_pdparams",
    "read_state_dict",
    "save_safetensors",
    "state_dict_of",
]
