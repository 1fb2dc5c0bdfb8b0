"""Bytes → a checkpoint: one reader per format, chosen by the file's content through one table.

``open_checkpoint`` reads a file once (``files.read_file_bounded``), names its format by its bytes
(``formats.sniff``) and hands the bytes to ``READERS[format]``; no pickled code runs in any of them. A
``Checkpoint`` holds the content as its file states it (a PaddleClas file keeps Paddle's names): turning it
into a state dict named like this project's modules is ``state_dict.state_dict_of``'s job.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load

from .choices import training_choice
from .errors import CheckpointError, CheckpointNotFound, one_line
from .files import MAX_BYTES_ENV, Limits, limits, read_checkpoint_file
from .formats import describe, sniff
from .pdparams import unpickle_pdparams
from .safetensors_header import check_safetensors

PathLike = str | os.PathLike

# keys every training checkpoint (``micronet train``'s last.pt / best.pt) holds
TRAINING_KEYS = ("model", "model_name", "num_classes", "in_chans", "img_size", "class_names")
MAX_OBJECTS = 1_000_000


@dataclass
class Checkpoint:
    """A checkpoint read once: its format (a key of ``READERS``), its content as the file states it, metadata.

    ``content`` is the dict ``torch.load`` returned for a PyTorch file, the tensors for the others (Paddle's
    names for a ``.pdparams``); ``metadata`` is what the file says about itself: a ``.safetensors`` file's
    string map, a PyTorch file's model and class entries (none for a ``.pdparams``). ``training`` marks this
    project's ``last.pt`` / ``best.pt``; ``model_choice`` is the model name and arguments a PyTorch file
    records, checked (``choices.check_model_choice``), else None.
    """

    path: Path
    format: str
    content: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    training: bool = False
    model_choice: tuple[str, dict[str, Any]] | None = None
    limits: Limits = field(default_factory=limits)


CheckpointFile = Checkpoint  # the name before checkpoints/ existed


def _torch_reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (its advice to retry with weights_only=False is left out)."""
    text = str(err)
    found = re.search(r"Unsupported (global|operand)[^\n]*", text)
    if found:
        return one_line(found.group(0), 200)
    lines = [ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "torch.load" not in ln]
    return one_line(f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": "), 200)


def _bound_tensors(obj: Any, source: str, budget: int) -> None:
    """Refuse a PyTorch file whose tensors (model, EMA, optimiser state alike) claim more than the size limit.

    A stored tensor's logical size is its storage's in any real file; a stride-0 view of a billion elements
    costs a few bytes of file and gigabytes once an optimiser or ``contiguous()`` copies it.
    """
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_OBJECTS:
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


def read_torch(data: bytes, path: Path, bounds: Limits) -> Checkpoint:
    """A ``torch.save`` file (zip or legacy) through ``torch.load(weights_only=True)``, its tensors bounded."""
    source = str(path)
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
    _bound_tensors(obj, source, bounds.file)
    meta = {k: obj[k] for k in ("model_name", "arch", "num_classes", "class_names", "in_chans") if k in obj}
    choice = training_choice(obj, source) if "model_name" in obj or "config" in obj else None
    return Checkpoint(path, "torch", obj, meta, is_training_checkpoint(obj), choice, bounds)


def read_safetensors(data: bytes, path: Path, bounds: Limits) -> Checkpoint:
    """A ``.safetensors`` file, its header checked against the file's size before the library sees it."""
    meta = check_safetensors(data, str(path))
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable .safetensors file ({one_line(err, 200)})") from err
    return Checkpoint(path, "safetensors", tensors, meta, limits=bounds)


def read_pdparams_checkpoint(data: bytes, path: Path, bounds: Limits) -> Checkpoint:
    """A PaddleClas ``.pdparams`` through the numpy-free unpickler, bounded by the ``.pdparams`` size limit."""
    return Checkpoint(path, "pdparams", unpickle_pdparams(data, str(path), bounds.pdparams), limits=bounds)


# format (as ``formats.sniff`` names it) -> its reader
READERS: dict[str, Callable[[bytes, Path, Limits], Checkpoint]] = {
    "torch": read_torch,
    "safetensors": read_safetensors,
    "pdparams": read_pdparams_checkpoint,
}


def checkpoint_from_bytes(data: bytes, path: PathLike, bounds: Limits | None = None) -> Checkpoint:
    """A checkpoint from bytes already read (``path`` names it in errors); by content, never by name."""
    path = Path(path)
    reader = READERS.get(sniff(data))
    if reader is None:
        raise CheckpointError(f"{path}: not a checkpoint this package reads: {describe(data, path.suffix)}")
    return reader(data, path, bounds or limits())


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Read any supported checkpoint once, by its content (not its name); every failure is a CheckpointError.

    PyTorch files go through ``torch.load(weights_only=True)`` on the file's bytes, ``.pdparams`` through the
    numpy-free unpickler, ``.safetensors`` after its header is checked against the file's size. A training
    checkpoint's model name and arguments are checked (``choices.check_model_choice``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    data, bounds = read_checkpoint_file(path)
    return checkpoint_from_bytes(data, path, bounds)


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """A PyTorch checkpoint file as a dict, read with ``weights_only=True`` (no pickled code runs)."""
    ck = open_checkpoint(path)
    if ck.format != "torch":
        raise CheckpointError(f"{path}: a {ck.format} weights file, not a PyTorch checkpoint (a .pt of micronet train)")
    return ck.content


def is_training_checkpoint(obj: Mapping[str, Any]) -> bool:
    """True for this project's ``last.pt`` / ``best.pt`` (as opposed to published weights files)."""
    return all(k in obj for k in TRAINING_KEYS) and isinstance(obj.get("model"), Mapping)


__all__ = [
    "READERS",
    "TRAINING_KEYS",
    "Checkpoint",
    "CheckpointFile",
    "checkpoint_from_bytes",
    "is_training_checkpoint",
    "open_checkpoint",
    "read_checkpoint",
    "read_pdparams_checkpoint",
    "read_safetensors",
    "read_torch",
]
