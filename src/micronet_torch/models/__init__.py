"""The model library: MicroNet's row tables, blocks and network, its names, MAdds, and the baselines.

``create_model`` turns any name into a model (a MicroNet, ``mobilenetv3_small_w<width>`` or a timm model;
``build_model`` is the same function under its older name). Reading checkpoints is ``micronet_torch.checkpoints``:
its names (``load_model``, ``CheckpointError``, ``read_state_dict`` ...) are still served from here, loaded
only when first asked for, so that building a model by name never imports the checkpoint readers.
"""

from typing import Any

from .baselines import baseline_name, match_width, mobilenetv3_small
from .blocks import MicroBlock, Variant
from .micronet import MicroNet
from .profile import Profile, format_profile, profile_model
from .registry import build_model, create_model, is_micronet, list_models, pretrained_cfg, resolve_name
from .specs import MODEL_SPECS, PADDLECLAS_URLS, BlockSpec, MicroNetSpec

# names that moved to ``checkpoints`` and are still served from here, on first use
CHECKPOINT_NAMES = frozenset(
    {
        "CheckpointError",
        "LoadedModel",
        "canonical_name",
        "checkpoint_metadata",
        "fetch_pretrained",
        "guess_model",
        "imagenet_class_names",
        "load_into",
        "load_model",
        "load_pretrained",
        "published_data_config",
        "read_checkpoint",
        "read_pdparams",
        "read_state_dict",
        "save_safetensors",
    }
)


def __getattr__(name: str) -> Any:
    if name in CHECKPOINT_NAMES:
        from .. import checkpoints  # on first use only: building by name never needs the readers

        return getattr(checkpoints, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *CHECKPOINT_NAMES})


__all__ = [
    "MODEL_SPECS",
    "PADDLECLAS_URLS",
    "BlockSpec",
    "MicroBlock",
    "MicroNet",
    "MicroNetSpec",
    "Profile",
    "Variant",
    "baseline_name",
    "build_model",
    "create_model",
    "format_profile",
    "is_micronet",
    "list_models",
    "match_width",
    "mobilenetv3_small",
    "pretrained_cfg",
    "profile_model",
    "resolve_name",
]
