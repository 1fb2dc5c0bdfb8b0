"""A model's weights → a clean ``.safetensors`` that records what evaluating them needs, written atomically."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from .._fs import atomic_write
from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY
from .errors import CheckpointWriteError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _blocking_file(path: Path) -> Path | None:
    """The first of ``path``'s folders that exists but is not a folder."""
    for folder in reversed(path.parents):
        if folder.exists() and not folder.is_dir():
            return folder
    return None


def why_not_written(path: Path, err: OSError) -> str:
    """Why writing ``path`` failed, in words a user can act on (the file system's error, named)."""
    code = err.errno
    if code == errno.ENAMETOOLONG:
        return f"the name is too long for the file system ({len(path.name.encode())} bytes); choose a shorter one"
    if code in (errno.EEXIST, errno.ENOTDIR) and (blocker := _blocking_file(path)) is not None:
        return f"{blocker} is a file, not a folder"
    if code == errno.EROFS:
        return f"{path.parent} is on a read-only file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"no permission to create files in {path.parent}"
    if code in _DISK_FULL:
        return f"the disk holding {path.parent} is full"
    if code == errno.EFBIG:
        return "the file would be larger than the file-size limit (ulimit -f)"
    return err.strerror or type(err).__name__


def save_safetensors(
    model_or_sd: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    model_name: str,
    *,
    data_config: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a clean ``.safetensors`` (no ``module.`` prefix, no buffers that are not saved) atomically.

    The metadata records what evaluating the weights needs besides them, so that ``load_model`` sees images
    as the original checkpoint did: the model and its arguments, the input size and preprocessing
    (``data_config``: ``DataConfig.to_dict()``), and the class names, each as JSON. Missing parent folders
    are created; a write that fails (no permission, full disk) leaves nothing behind: not the file, not a
    temporary file, not a folder it created; it raises ``CheckpointWriteError`` saying why.
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
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, lambda out: out.write(payload))
    except BaseException as err:
        for folder in created:  # innermost first; only the empty folders this call made
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, OSError):
            failed = CheckpointWriteError(f"cannot write {path}: {why_not_written(path, err)}; nothing was written")
            failed.errno = err.errno
            raise failed from err
        raise


__all__ = ["save_safetensors"]
