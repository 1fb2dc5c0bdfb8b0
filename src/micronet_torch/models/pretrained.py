"""The published ImageNet weights: PaddleClas's URL table, the local cache, download and one-time conversion.

``create_model(name, pretrained=True)`` looks in ``$MICRONET_TORCH_HOME`` (default ``~/.cache/micronet_torch``)
for ``<name>.safetensors``, then for PaddleClas's ``MicroNet_Mx_pretrained.pdparams``, and downloads that
file only when neither is there, keeping it only when its SHA-256 is the published one; it is converted
once, strictly, into the clean ``.safetensors``.
"""

from __future__ import annotations

import os
import shutil
import sys
import urllib.request
from pathlib import Path

from torch import nn

from .._env import cache_root
from .._fs import DownloadError, atomic_write, download_verified, verify_or_delete
from ..data.config import IMAGENET_MEAN, IMAGENET_STD
from .micronet import MicroNet
from .specs import MODEL_SPECS
from .weights import CheckpointError, load_into, read_state_dict, save_safetensors

PADDLECLAS_URLS = {
    "micronet_m0": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M0_pretrained.pdparams",
    "micronet_m1": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M1_pretrained.pdparams",
    "micronet_m2": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M2_pretrained.pdparams",
    "micronet_m3": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M3_pretrained.pdparams",
}


# The SHA-256 of each published file, checked before a download enters the cache. They must be recorded
# from the files PaddleClas publishes (download once, ``sha256sum``, paste here; docs/usage.md says how);
# they could not be recorded where this table was written (no network), so they are None for now, and
# fetch_pretrained refuses to download a file whose hash is unknown unless told to trust it.
PADDLECLAS_SHA256: dict[str, str | None] = {
    "micronet_m0": None,
    "micronet_m1": None,
    "micronet_m2": None,
    "micronet_m3": None,
}
TRUST_ENV = "MICRONET_TRUST_UNVERIFIED_DOWNLOAD"


def cached_weights_path(name: str) -> Path:
    return cache_root() / f"{name}.safetensors"


def _paddle_filename(name: str) -> str:
    return f"MicroNet_{name.split('_')[-1].upper()}_pretrained.pdparams"


def download(url: str, dest: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``url`` (http(s) or file://) to ``dest`` atomically, unverified; a partial download never remains.

    For files without a known SHA-256; published weights go through ``_fs.download_verified``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return atomic_write(dest, lambda out: shutil.copyfileobj(resp, out))
    except (OSError, ValueError) as err:
        raise DownloadError(f"could not download {url} ({err}); nothing was kept at {dest}") from err


def _expected_sha256(name: str, sha256: str | None) -> str | None:
    """The hash to check a download of ``name`` against; None only when the user chose to trust it unverified."""
    expected = sha256 or PADDLECLAS_SHA256.get(name)
    if expected:
        return expected
    if os.environ.get(TRUST_ENV, "").strip() == "1":
        return None
    raise CheckpointError(
        f"no SHA-256 is recorded for {name}'s published weights, so a download could not be checked and is refused; "
        f"pass fetch_pretrained({name!r}, sha256=...) with the hash of the published file, or set {TRUST_ENV}=1 to "
        f"download it unverified (or put a file you trust at {cache_root() / _paddle_filename(name)})"
    )


def _convert(name: str, paddle_file: Path, target: Path, downloaded: bool) -> Path:
    """Convert the cached ``.pdparams`` into ``<name>.safetensors``; a file that does not parse is deleted."""
    try:
        model = load_into(MicroNet(MODEL_SPECS[name]), read_state_dict(paddle_file), source=str(paddle_file))
    except CheckpointError as err:
        paddle_file.unlink(missing_ok=True)
        when = "was downloaded" if downloaded else "was in the cache"
        raise CheckpointError(
            f"{paddle_file} {when} but is not {name}'s weights ({err}); it was deleted, and the next "
            "pretrained=True downloads it again"
        ) from err
    save_safetensors(model, target, name, data_config=_published_transform(), class_names=None)
    return target


def _published_transform() -> dict[str, object]:
    """The published evaluation transform, recorded in the converted file (what the paper evaluated with)."""
    return dict(
        img_size=224, in_chans=3, policy="crop", crop_pct=0.875, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)
    )


def fetch_pretrained(name: str, url: str | None = None, sha256: str | None = None) -> Path:
    """Path of ``name``'s ImageNet weights as ``.safetensors`` in the cache; download, check and convert once.

    Looks for ``<cache>/<name>.safetensors``, then PaddleClas's ``MicroNet_Mx_pretrained.pdparams`` in the
    cache (checked against its SHA-256 when one is known: a mismatch is deleted), then downloads that file
    from PaddleClas (or ``url``) through ``_fs.download_verified``: it enters the cache only when its SHA-256
    is ``sha256`` or the one in ``PADDLECLAS_SHA256``. Without a known hash the download is refused unless
    ``$MICRONET_TRUST_UNVERIFIED_DOWNLOAD`` is 1. A cached file that does not parse is deleted too.
    """
    target = cached_weights_path(name)
    if target.is_file():
        return target
    if name not in PADDLECLAS_URLS and url is None:
        raise CheckpointError(f"no published ImageNet weights exist for {name}; pass pretrained=<path> instead")
    url = url or PADDLECLAS_URLS[name]
    paddle_file = cache_root() / _paddle_filename(name)
    known = sha256 or PADDLECLAS_SHA256.get(name)
    if paddle_file.is_file():
        if known:
            try:
                verify_or_delete(paddle_file, known, f"copy of {name}'s published weights")
            except DownloadError as err:
                raise CheckpointError(str(err)) from err
        return _convert(name, paddle_file, target, downloaded=False)
    expected = _expected_sha256(name, sha256)
    try:
        if expected is None:
            print(f"warning: downloading {url} without a SHA-256 check ({TRUST_ENV}=1)", file=sys.stderr)
            download(url, paddle_file)
        else:
            download_verified(url, paddle_file, expected)
    except DownloadError as err:
        raise CheckpointError(
            f"{err}; without a network, download that file elsewhere and put it at {paddle_file} "
            f"(or a converted file at {target}); set MICRONET_TORCH_HOME to use another folder."
        ) from err
    return _convert(name, paddle_file, target, downloaded=True)


def load_pretrained(model: nn.Module, source: bool | str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """Load ``source`` (a path, or ``True`` for the cached ImageNet weights) into ``model``."""
    name = getattr(getattr(model, "spec", None), "name", None)
    if source is True:
        if name is None:
            raise CheckpointError("pretrained=True needs a registered MicroNet")
        source = fetch_pretrained(name)
        try:
            state_dict = read_state_dict(source)
        except CheckpointError as err:  # the converted file in the cache was damaged or replaced
            Path(source).unlink(missing_ok=True)
            raise CheckpointError(
                f"{err}; it was deleted from the cache, and the next pretrained=True converts it again"
            ) from err
    else:
        state_dict = read_state_dict(source)
    return load_into(model, state_dict, source=str(source), num_classes=num_classes)
