"""The published ImageNet weights: PaddleClas's URL table, the local cache, download, hashes, one-time conversion.

``create_model(name, pretrained=True)`` looks in ``$MICRONET_TORCH_HOME`` (default ``~/.cache/micronet_torch``)
for ``<name>.safetensors``, then for PaddleClas's ``MicroNet_Mx_pretrained.pdparams``, and downloads that file
over HTTPS only when neither is there; the ``.pdparams`` is converted once, strictly, into the clean
``.safetensors``. Every file is read with the bounded, numpy-free readers and hashed from the same bytes that
are parsed.

Hashes: a file is checked against the SHA-256 pinned in ``PADDLECLAS_SHA256`` (or passed as ``sha256=``) where
one is known. Where none is, ``pretrained=True`` trusts the first download (trust on first use, said once on
stderr) and records its SHA-256, and that of the converted file, in ``<cache>/pretrained-sha256.json``; every
later use and every later download is checked against the record, and a mismatch is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from torch import nn

from .._env import cache_root
from .._fs import DownloadError, atomic_write, download_verified
from ..data.config import IMAGENET_MEAN, IMAGENET_STD
from ..models.micronet import MicroNet
from ..models.specs import MODEL_SPECS, PADDLECLAS_URLS
from .errors import CheckpointError, one_line
from .files import file_limit, max_checkpoint_bytes, read_file_bounded
from .readers import checkpoint_from_bytes
from .save import save_safetensors
from .state_dict import read_state_dict, state_dict_of
from .strict import load_into

# The SHA-256 of each published file where it is known (pinned: checked before a download enters the cache).
# PaddleClas publishes none, and they could not be taken from the files where this table was written (no
# network), so none is pinned yet: pretrained=True trusts the first download and records its hash instead
# (docs/usage.md says how to pin one).
PADDLECLAS_SHA256: dict[str, str | None] = {
    "micronet_m0": None,
    "micronet_m1": None,
    "micronet_m2": None,
    "micronet_m3": None,
}
TRUST_ENV = "MICRONET_TRUST_UNVERIFIED_DOWNLOAD"
RECORD_NAME = "pretrained-sha256.json"
MAX_RECORD_BYTES = 1 << 20


def cached_weights_path(name: str) -> Path:
    """Where ``name``'s converted ImageNet weights are cached."""
    return cache_root() / f"{name}.safetensors"


def record_path() -> Path:
    """The file of SHA-256s recorded on first use (trust on first use), beside the cached weights."""
    return cache_root() / RECORD_NAME


def _paddle_filename(name: str) -> str:
    return f"MicroNet_{name.split('_')[-1].upper()}_pretrained.pdparams"


# ---- the record of hashes trusted on first use --------------------------------------------------
def _read_record() -> dict[str, dict[str, str]]:
    path = record_path()
    if not path.is_file():
        return {}
    data = read_file_bounded(path, MAX_RECORD_BYTES, "record of hashes")
    try:
        record = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise CheckpointError(
            f"{path}: the record of the SHA-256s of the pretrained weights is not valid JSON ({one_line(err, 80)}); "
            "delete it to trust the next download anew"
        ) from err
    if type(record) is not dict or not all(type(v) is dict for v in record.values()):
        raise CheckpointError(f"{path}: not a record of SHA-256s (a JSON object per model); delete it to start anew")
    return record


def recorded_sha256(name: str) -> dict[str, str]:
    """The SHA-256s recorded for ``name``: ``pdparams`` (the download) and ``safetensors`` (its conversion)."""
    return {k: v for k, v in _read_record().get(name, {}).items() if type(v) is str}


def _write_record(name: str, **hashes: str | None) -> None:
    """Record (or, with None, forget) SHA-256s for ``name``; written atomically."""
    record = _read_record()
    entry = {**record.get(name, {}), **hashes}
    record[name] = {k: v for k, v in entry.items() if v is not None}
    payload = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(record_path(), lambda out: out.write(payload))


def _trusting(name: str, what: str, sha: str) -> None:
    """Say, once (when the hash is recorded), that a file was trusted on first use."""
    print(
        f"note: no SHA-256 is pinned for {name}'s {what}; trusting it on first use (SHA-256 {sha}) and recording "
        f"that in {record_path()}: every later use and download of it is checked against it",
        file=sys.stderr,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- downloads ----------------------------------------------------------------------------------
def download(url: str, dest: str | os.PathLike, timeout: float = 60.0, max_bytes: int | None = None) -> Path:
    """Download ``url`` (https:// or file://) to ``dest`` atomically, unverified; a partial download never remains.

    For files without a known SHA-256 (their hash is recorded after); files with one go through
    ``_fs.download_verified``. ``max_bytes`` bounds the download.
    """
    if not url.startswith(("https://", "file://")):
        raise DownloadError(f"refusing to download {url!r} without a known SHA-256 over anything but https://")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def copy(out: Any, resp: Any) -> None:
        size = 0
        while block := resp.read(1 << 20):
            size += len(block)
            if max_bytes is not None and size > max_bytes:
                raise DownloadError(f"{url} is larger than {max_bytes} bytes, more than the file can be")
            out.write(block)

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return atomic_write(dest, lambda out: copy(out, resp))
    except DownloadError:
        raise
    except (OSError, ValueError) as err:
        raise DownloadError(f"could not download {url} ({err}); nothing was kept at {dest}") from err


def _expected_sha256(name: str, sha256: str | None, trust_on_first_use: bool) -> str | None:
    """The hash to check a download of ``name`` against; None when it is to be trusted on first use."""
    expected = sha256 or PADDLECLAS_SHA256.get(name) or recorded_sha256(name).get("pdparams")
    if expected or trust_on_first_use or os.environ.get(TRUST_ENV, "").strip() == "1":
        return expected
    raise CheckpointError(
        f"no SHA-256 is recorded for {name}'s published weights, so a download could not be checked and is refused; "
        f"pass fetch_pretrained({name!r}, sha256=...) with the hash of the published file, use "
        f"create_model({name!r}, pretrained=True) to trust the first download and record its hash, or set "
        f"{TRUST_ENV}=1 to download it unverified (or put a file you trust at {cache_root() / _paddle_filename(name)})"
    )


# ---- conversion ---------------------------------------------------------------------------------
def _published_transform() -> dict[str, object]:
    """The published evaluation transform, recorded in the converted file (what the paper evaluated with)."""
    return dict(
        img_size=224, in_chans=3, policy="crop", crop_pct=0.875, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)
    )


def _convert(name: str, paddle_file: Path, target: Path, expected: str | None, downloaded: bool) -> Path:
    """Check the cached ``.pdparams`` (``expected``, else trusted on first use), convert it into
    ``<name>.safetensors`` and record both hashes; a file that fails its check or does not parse is deleted."""
    data = read_file_bounded(paddle_file, max_checkpoint_bytes(), ".pdparams")
    got = _sha256(data)
    if expected and got != expected.strip().lower():
        paddle_file.unlink(missing_ok=True)
        raise CheckpointError(
            f"{paddle_file}: this copy of {name}'s published weights has SHA-256 {got}, expected {expected} "
            f"(pinned, passed or recorded in {record_path()}; truncated or replaced); it was deleted and will be "
            "downloaded again next time"
        )
    try:
        sd = state_dict_of(checkpoint_from_bytes(data, paddle_file))
        model = load_into(MicroNet(MODEL_SPECS[name]), sd, source=str(paddle_file))
    except CheckpointError as err:
        paddle_file.unlink(missing_ok=True)
        when = "was downloaded" if downloaded else "was in the cache"
        raise CheckpointError(
            f"{paddle_file} {when} but is not {name}'s weights ({err}); it was deleted, and the next "
            "pretrained=True downloads it again"
        ) from err
    save_safetensors(model, target, name, data_config=_published_transform(), class_names=None)
    if not expected:
        _trusting(name, f"published weights ({paddle_file.name})", got)
    _write_record(name, pdparams=got, safetensors=_sha256(target.read_bytes()))
    return target


def _check_cached(name: str, target: Path) -> bytes:
    """The bytes of the cached ``.safetensors``, checked against the SHA-256 recorded for it."""
    data = read_file_bounded(target, file_limit())
    recorded = recorded_sha256(name).get("safetensors")
    got = _sha256(data)
    if recorded and got != recorded:
        target.unlink(missing_ok=True)
        _write_record(name, safetensors=None)
        raise CheckpointError(
            f"{target}: SHA-256 {got} is not the {recorded} recorded when it was written ({record_path()}); the "
            "cached file was changed or replaced. It was deleted: the next pretrained=True converts the cached "
            ".pdparams again (its own hash checked)"
        )
    return data


def fetch_pretrained(
    name: str, url: str | None = None, sha256: str | None = None, *, trust_on_first_use: bool = False
) -> Path:
    """Path of ``name``'s ImageNet weights as ``.safetensors`` in the cache; download, check and convert once.

    Looks for ``<cache>/<name>.safetensors`` (checked against its recorded SHA-256), then PaddleClas's
    ``MicroNet_Mx_pretrained.pdparams`` in the cache, then downloads that file from PaddleClas (or ``url``).
    The ``.pdparams`` is checked against ``sha256``, else the pinned hash in ``PADDLECLAS_SHA256``, else the one
    recorded on first use; without any, the download is refused unless ``trust_on_first_use`` (what
    ``pretrained=True`` passes) or ``$MICRONET_TRUST_UNVERIFIED_DOWNLOAD`` is 1. A file that fails its check or
    does not parse is deleted.
    """
    target = cached_weights_path(name)
    if target.is_file():
        _check_cached(name, target)
        return target
    if name not in PADDLECLAS_URLS and url is None:
        raise CheckpointError(f"no published ImageNet weights exist for {name}; pass pretrained=<path> instead")
    url = url or PADDLECLAS_URLS[name]
    paddle_file = cache_root() / _paddle_filename(name)
    if paddle_file.is_file():  # downloaded before, or put there by the user: trusted on first use when unpinned
        expected = sha256 or PADDLECLAS_SHA256.get(name) or recorded_sha256(name).get("pdparams")
        return _convert(name, paddle_file, target, expected, downloaded=False)
    expected = _expected_sha256(name, sha256, trust_on_first_use)
    try:
        if expected:
            download_verified(url, paddle_file, expected, max_bytes=max_checkpoint_bytes())
        else:
            if not trust_on_first_use:
                print(f"warning: downloading {url} without a SHA-256 check ({TRUST_ENV}=1)", file=sys.stderr)
            download(url, paddle_file, max_bytes=max_checkpoint_bytes())
    except DownloadError as err:
        raise CheckpointError(
            f"{err}; without a network, download that file elsewhere and put it at {paddle_file} "
            f"(or a converted file at {target}); set MICRONET_TORCH_HOME to use another folder."
        ) from err
    return _convert(name, paddle_file, target, expected, downloaded=True)


def load_pretrained(model: nn.Module, source: bool | str | os.PathLike, num_classes: int | None = None) -> nn.Module:
    """Load ``source`` (a path, or ``True`` for the cached ImageNet weights) into ``model``."""
    name = getattr(getattr(model, "spec", None), "name", None)
    if source is not True:
        return load_into(model, read_state_dict(source), source=str(source), num_classes=num_classes)
    if name is None:
        raise CheckpointError("pretrained=True needs a registered MicroNet")
    target = cached_weights_path(name)
    if not target.is_file():
        fetch_pretrained(name, trust_on_first_use=True)
    data = _check_cached(name, target)  # the bytes hashed are the bytes parsed
    try:
        state_dict = state_dict_of(checkpoint_from_bytes(data, target))
    except CheckpointError as err:  # the converted file in the cache was damaged or replaced
        target.unlink(missing_ok=True)
        _write_record(name, safetensors=None)
        raise CheckpointError(
            f"{err}; it was deleted from the cache, and the next pretrained=True converts it again"
        ) from err
    if "safetensors" not in recorded_sha256(name):  # put there by the user, or cached before hashes were recorded
        _trusting(name, f"converted weights ({target.name})", _sha256(data))
        _write_record(name, safetensors=_sha256(data))
    return load_into(model, state_dict, source=str(target), num_classes=num_classes)


__all__ = [
    "PADDLECLAS_SHA256",
    "PADDLECLAS_URLS",
    "TRUST_ENV",
    "cached_weights_path",
    "download",
    "fetch_pretrained",
    "load_pretrained",
    "record_path",
    "recorded_sha256",
]
