"""Values read from a checkpoint that choose code: the model name and its keyword arguments, checked.

A training checkpoint names the model to build and the arguments to build it with. Passed on unchecked,
a file could make timm build anything it can build with any arguments (a ``checkpoint_path`` makes timm
open another file; an ``hf-hub:`` name downloads one). Only the names this package builds are accepted, and
only the MicroNet keywords with plain values; anything else is a ``CheckpointError``.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any

import timm

from .baselines import MNV3_SMALL
from .blocks import Variant
from .errors import CheckpointError
from .specs import MODEL_SPECS, PREPRINT_ALIASES

# the keywords create_model / build_model take from a checkpoint (TrainConfig.model_kwargs, --drop-rate)
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


__all__ = ["MODEL_KWARGS", "check_model_choice", "is_buildable_name"]
