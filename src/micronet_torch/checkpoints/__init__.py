"""Checkpoints: bytes → a checkpoint → a state dict for a model → a loaded model; the published weights.

One load passes each stage once: ``files`` (the bytes, bounded) → ``formats`` (what they are) → ``readers``
(``READERS[format]``: ``torch.load(weights_only=True)``, the PaddleClas unpickler in ``pdparams``, safetensors)
→ ``state_dict`` (each source's key map as a timm-style filter function, then the tensors checked) →
``choices`` (which model, checked) → ``models.create_model`` → ``strict`` (every tensor used, every shape
checked). ``loader.load_model`` runs that path for any file; ``pretrained`` downloads, checks and converts
the published ImageNet weights; ``save`` writes the clean ``.safetensors``.

This package imports ``models``; ``models`` builds by name without it and imports it only when weights are
asked for (``create_model(..., pretrained=...)``).
"""

from .choices import CLASSIFIER_PREFIX, STEM_CONV_KEY, check_model_choice, guess_model
from .errors import CheckpointError, CheckpointNotFound, CheckpointWriteError
from .files import MAX_BYTES_ENV, max_checkpoint_bytes, read_file_bounded
from .loader import LoadedModel, canonical_name, imagenet_class_names, load_model, published_data_config
from .pretrained import PADDLECLAS_SHA256, PADDLECLAS_URLS, fetch_pretrained, load_pretrained
from .readers import READERS, Checkpoint, is_training_checkpoint, open_checkpoint, read_checkpoint
from .save import save_safetensors
from .state_dict import (
    FILTERS,
    check_tensors,
    checkpoint_filter_fn,
    checkpoint_metadata,
    paddleclas_filter_fn,
    pdparams_from_bytes,
    published_filter_fn,
    read_pdparams,
    read_state_dict,
    state_dict_of,
)
from .strict import load_into

__all__ = [
    "CLASSIFIER_PREFIX",
    "FILTERS",
    "MAX_BYTES_ENV",
    "PADDLECLAS_SHA256",
    "PADDLECLAS_URLS",
    "READERS",
    "STEM_CONV_KEY",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFound",
    "CheckpointWriteError",
    "LoadedModel",
    "canonical_name",
    "check_model_choice",
    "check_tensors",
    "checkpoint_filter_fn",
    "checkpoint_metadata",
    "fetch_pretrained",
    "guess_model",
    "imagenet_class_names",
    "is_training_checkpoint",
    "load_into",
    "load_model",
    "load_pretrained",
    "max_checkpoint_bytes",
    "open_checkpoint",
    "paddleclas_filter_fn",
    "pdparams_from_bytes",
    "published_data_config",
    "published_filter_fn",
    "read_checkpoint",
    "read_file_bounded",
    "read_pdparams",
    "read_state_dict",
    "save_safetensors",
    "state_dict_of",
]
