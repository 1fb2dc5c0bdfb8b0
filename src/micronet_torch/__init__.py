"""micronet-torch: MicroNet (Li et al., ICCV 2021), exact to the published weights.

``create_model`` builds M0-M3 (and the preprint's family) by name, with weights when asked
(``pretrained=``); importing the package registers them with timm. ``checkpoints.load_model`` loads any
checkpoint file. ``ops`` holds the paper's two operators for use in other networks. The layers, from the
bottom: ``ops`` → ``models``, ``checkpoints`` → ``deploy`` → ``runtime`` / ``train`` → ``tools`` → ``cli``
(``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from . import _compat
from ._env import __version__

if TYPE_CHECKING:
    import torch

    from .models import Profile

# the public names, imported on first use (PEP 562) so that ``import micronet_torch`` and the ``micronet``
# command start without torch; ``micronet --help`` then takes a fraction of a second
_MODELS_NAMES = ("MODEL_SPECS", "BlockSpec", "MicroBlock", "MicroNet", "MicroNetSpec", "Profile", "Variant",
                 "create_model", "list_models", "profile_model", "resolve_name")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MODELS_NAMES:
        return getattr(importlib.import_module(".models", __name__), name)
    if not name.startswith("_"):  # a subpackage (``micronet_torch.models``, ``.train``, ...) on first use
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_with_timm() -> None:
    """Register every model with timm (``timm.create_model("micronet_m3")``): importing ``models`` does it."""
    importlib.import_module(".models", __name__)


_compat.install()
# importing the package registers the models with timm, as before: at once when timm is loaded already, else
# as soon as timm is imported (a hook that runs after timm's own import), so that torch loads only with timm
if "timm" in sys.modules:
    _register_with_timm()
else:
    _compat.after_import("timm", _register_with_timm)


def profile(model: torch.nn.Module, img_size: int = 224, in_chans: int | None = None) -> Profile:
    """Parameters and MAdds of ``model`` by the paper's rule (SPEC section 5); see ``models.profile_model``."""
    from .models import profile_model

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
