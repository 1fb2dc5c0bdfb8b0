"""micronet-torch: MicroNet (Li et al., ICCV 2021), exact to the published weights.

``create_model`` builds M0-M3 (and the preprint's family) by name, with weights when asked
(``pretrained=``); importing the package registers them with timm. ``checkpoints.load_model`` loads any
checkpoint file. ``ops`` holds the paper's two operators for use in other networks. The layers, from the
bottom: ``ops`` → ``models``, ``checkpoints`` → ``deploy`` → ``runtime`` / ``train`` → ``tools`` → ``cli``
(``docs/architecture.md``).
"""

import torch

from . import _compat
from ._env import __version__
from .models import (
    MODEL_SPECS,
    BlockSpec,
    MicroBlock,
    MicroNet,
    MicroNetSpec,
    Profile,
    Variant,
    create_model,
    list_models,
    profile_model,
    resolve_name,
)

_compat.install()


def profile(model: torch.nn.Module, img_size: int = 224, in_chans: int | None = None) -> Profile:
    """Parameters and MAdds of ``model`` by the paper's rule (SPEC section 5); see ``models.profile_model``."""
    return profile_model(model, img_size=img_size, in_chans=in_chans)


__all__ = [
    "MODEL_SPECS",
    "BlockSpec",
    "MicroBlock",
    "MicroNet",
    "MicroNetSpec",
    "Variant",
    "__version__",
    "create_model",
    "list_models",
    "profile",
    "resolve_name",
]
