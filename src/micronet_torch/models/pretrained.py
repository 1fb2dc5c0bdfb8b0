"""The published ImageNet weights: PaddleClas's URL table, the local cache, download and one-time conversion.

``create_model(name, pretrained=True)`` looks in ``$MICRONET_TORCH_HOME`` (default ``~/.cache/micronet_torch``)
for ``<name>.safetensors``, then for PaddleClas's ``MicroNet_Mx_pretrained.pdparams``, and downloads that
file only when neither is there; it is converted once, strictly, into the clean ``.safetensors``.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from torch import nn

from .._env import cache_root
from .._fs import atomic_write
from .micronet import MicroNet
from .specs import MODEL_SPECS
from .weights import CheckpointError, load_into, read_state_dict, save_safetensors

PADDLECLAS_URLS = {
    "micronet_m0": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M0_pretrained.pdparams",
    "micronet_m1": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M1_pretrained.pdparams",
    "micronet_m2": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M2_pretrained.pdparams",
    "micronet_m3": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M3_pretrained.pdparams",
}


def cached_weights_path(name: str) -> Path:
    return cache_root() / f"{name}.safetensors"


def _paddle_filename(name: str) -> str:
    return f"MicroNet_{name.split('_')[-1].upper()}_pretrained.pdparams"


def download(url: str, dest: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``url`` (http(s) or file://) to ``dest`` atomically; a partial download never remains."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return atomic_write(dest, lambda out: shutil.copyfileobj(resp, out))


def fetch_pretrained(name: str, url: str | None = None) -> Path:
    """Path of ``name``'s ImageNet weights as ``.safetensors`` in the cache; download and convert once.

    Looks for ``<cache>/<name>.safetensors``, then PaddleClas's ``MicroNet_Mx_pretrained.pdparams`` in
    the cache, then downloads that file from PaddleClas (or ``url``) and converts it.
    """
    target = cached_weights_path(name)
    if target.is_file():
        return target
    if name not in PADDLECLAS_URLS and url is None:
        raise CheckpointError(f"no published ImageNet weights exist for {name}; pass pretrained=<path> instead")
    url = url or PADDLECLAS_URLS[name]
    paddle_file = cache_root() / _paddle_filename(name)
    if not paddle_file.is_file():
        try:
            download(url, paddle_file)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise CheckpointError(
                f"could not download {name}'s ImageNet weights from {url} ({err}).\n"
                f"Without a network, download that file elsewhere and put it at {paddle_file} "
                f"(or a converted file at {target}); set MICRONET_TORCH_HOME to use another folder."
            ) from err
    model = load_into(MicroNet(MODEL_SPECS[name]), read_state_dict(paddle_file), source=str(paddle_file))
    save_safetensors(model, target, name)
    return target


def load_pretrained(model: nn.Module, source: bool | str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """Load ``source`` (a path, or ``True`` for the cached ImageNet weights) into ``model``."""
    name = getattr(getattr(model, "spec", None), "name", None)
    if source is True:
        if name is None:
            raise CheckpointError("pretrained=True needs a registered MicroNet")
        source = fetch_pretrained(name)
    state_dict = read_state_dict(source)
    return load_into(model, state_dict, source=str(source), num_classes=num_classes)
