"""A state dict → a model, strictly: every tensor of the file used, every tensor of the model filled.

Mismatches are reported in one line by key and shape, with the model the file most resembles. The two
changes a caller may ask for are made here too: a head of another class count, and a stem for another
number of input channels (timm's ``adapt_input_conv``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models import adapt_input_conv
from torch import nn

from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY, guess_model
from .errors import CheckpointError, one_line


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
            sd[STEM_CONV_KEY] = adapt_input_conv(ours_w.shape[1], theirs_w)
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


__all__ = ["load_into"]
