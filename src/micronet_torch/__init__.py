"""micronet-torch: MicroNet (Li et al., ICCV 2021), exact to the published weights.

``create_model`` builds M0-M3 (and the preprint's family) by name; importing the package registers
them with timm. ``ops`` holds the paper's two operators for use in other networks.
"""

import torch

from .blocks import MicroBlock, Variant
from .model import MicroNet
from .profiler import Profile, profile_model
from .registry import create_model, list_models, resolve_name
from .specs import MODEL_SPECS, BlockSpec, MicroNetSpec

__version__ = "0.1.0"


def profile(model: torch.nn.Module, img_size: int = 224, in_chans: int | None = None) -> Profile:
    """Parameters and MAdds of ``model`` by the paper's rule (SPEC section 5); see ``profiler.profile_model``."""
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
