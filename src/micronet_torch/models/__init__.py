"""The model library: MicroNet's row tables, blocks and network, its names, weights and MAdds, and the baselines.

``build_model`` turns any name into a model (MicroNet, ``mobilenetv3_small_w<width>`` or a timm model) and
``load_model`` any checkpoint file into a model plus what the file knows; everything else calls them.
"""

from .baselines import baseline_name, match_width, mobilenetv3_small
from .blocks import MicroBlock, Variant
from .loader import LoadedModel, canonical_name, imagenet_class_names, load_model, published_data_config
from .micronet import MicroNet
from .pretrained import PADDLECLAS_URLS, fetch_pretrained, load_pretrained
from .profile import Profile, format_profile, profile_model
from .registry import build_model, create_model, is_micronet, list_models, pretrained_cfg, resolve_name
from .specs import MODEL_SPECS, BlockSpec, MicroNetSpec
from .weights import (
    CheckpointError,
    checkpoint_metadata,
    guess_model,
    load_into,
    read_checkpoint,
    read_pdparams,
    read_state_dict,
    save_safetensors,
)

__all__ = [
    "MODEL_SPECS",
    "PADDLECLAS_URLS",
    "BlockSpec",
    "CheckpointError",
    "LoadedModel",
    "MicroBlock",
    "MicroNet",
    "MicroNetSpec",
    "Profile",
    "Variant",
    "baseline_name",
    "build_model",
    "canonical_name",
    "checkpoint_metadata",
    "create_model",
    "fetch_pretrained",
    "format_profile",
    "guess_model",
    "imagenet_class_names",
    "is_micronet",
    "list_models",
    "load_into",
    "load_model",
    "load_pretrained",
    "match_width",
    "mobilenetv3_small",
    "pretrained_cfg",
    "profile_model",
    "published_data_config",
    "read_checkpoint",
    "read_pdparams",
    "read_state_dict",
    "resolve_name",
    "save_safetensors",
]
