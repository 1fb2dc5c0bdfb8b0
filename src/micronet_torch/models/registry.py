"""The one door to build a model: ``create_model`` (any name, optionally with weights), names, timm registration.

``create_model`` builds a MicroNet or a preprint alias, ``mobilenetv3_small_w<width>`` (the paper's baseline at
any width) or any timm model; ``pretrained=`` loads weights into a MicroNet through ``checkpoints``, which is
imported only then, so building by name never loads the checkpoint readers. Importing this module registers
every MicroNet with timm through its public ``register_model``, so ``timm.create_model("micronet_m3")`` works
once ``micronet_torch`` is imported; timm's entry points call ``create_model`` too.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import timm
from timm.models import FeatureListNet, build_model_with_cfg, model_entrypoint, register_model
from torch import nn

from ..data.config import IMAGENET_MEAN, IMAGENET_STD
from .baselines import MNV3_SMALL, mobilenetv3_small
from .micronet import MicroNet
from .specs import MODEL_SPECS, PADDLECLAS_URLS, PREPRINT_ALIASES, MicroNetSpec

__all__ = ["build_model", "create_model", "is_micronet", "list_models", "pretrained_cfg", "resolve_name"]

_logger = logging.getLogger(__name__)


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm-style pretrained config: input size, the published eval transform, normalisation, weights."""
    return dict(
        url=PADDLECLAS_URLS.get(name, ""),
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.875,
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv="features.0.stem.0.conv.0",
        classifier="classifier.2.linear.0",
        license="mit",
        origin_url="https://github.com/liyunsheng13/micronet",
        paper_ids="arXiv:2108.05894",
    )


def list_models() -> list[str]:
    """Every name ``create_model`` accepts: the models and the preprint's aliases."""
    return sorted([*MODEL_SPECS, *PREPRINT_ALIASES])


def resolve_name(name: str) -> tuple[MicroNetSpec, str | None]:
    """The spec behind a name, and an explanation when the name is a preprint alias."""
    key = name.lower().replace("-", "_")
    if key.startswith("timm/"):
        key = key[5:]
    note = None
    if key in PREPRINT_ALIASES:
        key, note = PREPRINT_ALIASES[key]
    if key not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODEL_SPECS[key], note


def _build_micronet(
    spec: MicroNetSpec,
    pretrained: bool | str | os.PathLike | None,
    num_classes: int | None,
    features_only: bool,
    out_indices: tuple[int, ...] | None,
    **kwargs: Any,
) -> nn.Module:
    model = build_model_with_cfg(
        MicroNet,
        spec.name,
        pretrained=False,
        pretrained_cfg=pretrained_cfg(spec.name),
        spec=spec,
        num_classes=1000 if num_classes is None else num_classes,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
    if pretrained:
        # the checkpoint readers load only when weights are asked for: building by name never imports them
        from ..checkpoints.pretrained import load_pretrained

        load_pretrained(model, pretrained, num_classes=num_classes)
    if features_only:
        model = FeatureListNet(model, out_indices=out_indices or tuple(range(5)), flatten_sequential=True)
    return model


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    num_classes: int | None = None,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The one way to turn a name into a model: a MicroNet, ``mobilenetv3_small_w<width>`` or any timm model.

    Args:
        name: one of ``list_models()`` (``micronet_m0`` ... ``micronet_m3``, the preprint's
            ``micronet_v1_m0`` ... ``micronet_v1_m3``), ``mobilenetv3_small_w<width>`` (the paper's baseline at
            any width), or a timm model name (random init).
        pretrained: ``None``/``False`` for random init; a path to a checkpoint (published ``.pth``,
            PaddleClas ``.pdparams``, this project's ``.pt`` / ``.safetensors``); ``True`` for the
            ImageNet weights from the local cache (downloaded once when missing, its SHA-256 checked).
            MicroNets only.
        num_classes: classes of the head (default: the checkpoint's, else 1000); a pretrained head of
            another size is replaced by a new one.
        in_chans: input channels (a pretrained stem's weights are summed/tiled to fit).
        features_only: return a timm ``FeatureListNet`` giving the maps at strides 2, 4, 8, 16, 32.
        **kwargs: ``drop_rate``, ``width`` (a width multiplier) and the ablation ``Variant`` fields
            (``activation``, ``shift``, ``depthwise``, ``pointwise``); other models take their own.
    """
    if is_micronet(name):
        spec, note = resolve_name(name)
        if note:
            _logger.info("%s: %s", name, note)
        return _build_micronet(spec, pretrained, num_classes, features_only, out_indices, in_chans=in_chans, **kwargs)
    if pretrained:
        raise ValueError(f"pretrained weights are only supported for MicroNets; {name} starts from random init")
    n_cls = 1000 if num_classes is None else num_classes
    if features_only:
        kwargs.update(features_only=True, **({"out_indices": out_indices} if out_indices is not None else {}))
    match = MNV3_SMALL.match(name)
    if match:
        return mobilenetv3_small(float(match.group(1)), num_classes=n_cls, in_chans=in_chans, **kwargs)
    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}, "
            "mobilenetv3_small_w<width>, or any timm model name"
        )
    return timm.create_model(name, num_classes=n_cls, in_chans=in_chans, **kwargs)


build_model = create_model  # the name of the one door before create_model served every name


def is_micronet(name: str) -> bool:
    """Whether ``name`` is one of ``list_models()`` (a MicroNet or a preprint alias)."""
    key = name.lower().replace("-", "_")
    return key.removeprefix("timm/") in list_models()


def _timm_entry(name: str, spec: MicroNetSpec):
    """timm's entry point for ``name``: timm's keyword conventions mapped onto ``create_model``."""

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
        for key in ("pretrained_cfg", "cache_dir"):
            kwargs.pop(key, None)
        if pretrained and overlay.get("file"):  # timm's way to name a local weights file
            pretrained = overlay["file"]
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__module__ = __name__
    entry.__doc__ = spec.description
    return entry


def _register_with_timm() -> None:
    """Register every MicroNet and preprint alias with timm's public ``register_model`` (once per process)."""
    module = sys.modules[__name__]
    for name in [*MODEL_SPECS, *PREPRINT_ALIASES]:
        if timm.is_model(name) and getattr(model_entrypoint(name), "__module__", None) == __name__:
            continue  # this module was imported again (a reload): keep the first registration
        fn = _timm_entry(name, resolve_name(name)[0])
        setattr(module, name, fn)
        register_model(fn)


_register_with_timm()
