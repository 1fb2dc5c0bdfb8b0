"""The evaluation preprocessing of an exported model, with numpy and Pillow only (no torch, no micronet_torch).

One image (a path or a PIL image) becomes the float32 array ``(1, C, H, W)`` (C-contiguous, NCHW) that an exported
file takes: read upright (EXIF orientation applied), 16-bit and float images scaled to 8 bit, palette / alpha /
bilevel images converted, RGB or greyscale as the model's channels; resized (antialiased bilinear) whole for the
``small`` policy or on its shorter side and centre-cropped for ``crop``; scaled to [0, 1], ``(x - mean) / std``.
``micronet eval`` / ``predict`` / int8 calibration read images through these functions, and docs/deploy.md
prints this file for the runtimes' snippets, so a deployed model sees the pixels the package evaluated.
Copy it next to your script; ``preprocess(image, metadata)`` takes the metadata an exported file carries.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageOps


def upright(img: Image.Image, channels: int = 3) -> Image.Image:
    """``img`` with its EXIF orientation applied, as 'L' (``channels == 1``, or a grey image) or 'RGB'.

    16-bit and float greyscale are scaled to 8 bit (Pillow's own ``convert`` clips at 255), palette images with
    transparency and LA / RGBA images lose their alpha, bilevel images become 'L'.
    """
    img.load()
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img)
        if img.mode == "F":
            arr = arr.astype(np.float32)
            arr = np.clip(arr / (1.0 if arr.max(initial=0.0) <= 1.0 else 255.0) * 255.0, 0, 255)
        else:
            arr = arr.astype(np.float64)
            wide = arr.max(initial=0) > 255 or img.mode.startswith("I;16")
            arr = np.clip(arr / (65535.0 if wide else 255.0) * 255.0, 0, 255)
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("1", "LA", "La"):
        img = img.convert("L")
    if channels == 1 or img.mode == "L":
        return img.convert("L") if img.mode != "L" else img.copy()
    return img.convert("RGB")


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) matrix of an antialiased bilinear resize (PIL's and ``torch.nn.functional.interpolate(...,
    antialias=True)``'s triangle filter, widened by the scale when shrinking)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) / support))
        out[i, lo:hi] = w / w.sum() if w.sum() else w
    return out


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``(H, W, C)`` resized to ``(height, width, C)``: antialiased bilinear, rounded half to even."""
    if pixels.shape[:2] == (height, width):
        return pixels
    x = pixels.astype(np.float64)
    if x.shape[1] != width:
        x = np.einsum("ow,hwc->hoc", _weights(x.shape[1], width), x)
    if x.shape[0] != height:
        x = np.einsum("oh,hwc->owc", _weights(x.shape[0], height), x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def eval_resize(pixels: np.ndarray, size: int, policy: str = "small", crop_pct: float = 0.875) -> np.ndarray:
    """The evaluation transform of uint8 ``(H, W, C)`` pixels: ``small`` resizes the whole image to ``size``;
    ``crop`` resizes the shorter side to ``floor(size / crop_pct)`` and takes the centre ``size`` x ``size``."""
    if policy == "small":
        return resize(pixels, size, size)
    h, w = pixels.shape[:2]
    short = int(size / crop_pct)
    hw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    x = resize(pixels, *hw)
    top, left = (hw[0] - size) // 2, (hw[1] - size) // 2
    return x[top : top + size, left : left + size]


def normalize(pixels: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 ``(H, W, C)`` to float32 ``(1, C, H, W)``, C-contiguous: ``(x / 255 - mean) / std`` per channel (a grey
    image is repeated to as many channels as ``mean`` has)."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    if x.shape[2] == 1 and len(mean) > 1:
        x = np.repeat(x, len(mean), axis=2)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def _value(meta: dict, key: str):
    value = meta[key]
    return json.loads(value) if isinstance(value, str) else value


def preprocess(image, meta: dict) -> np.ndarray:
    """The float32 ``(1, C, H, W)`` input of an exported model for ``image`` (a path or a PIL image), by the
    file's metadata: ``input_size`` ([C, H, W], or [batch, C, H, W]), ``mean``, ``std`` and ``resize``
    (``{"policy", "img_size", "crop_pct"}``), as JSON text or as values."""
    chans, size = _value(meta, "input_size")[-3:-1]
    resize_cfg = _value(meta, "resize")
    img = Image.open(image) if not isinstance(image, Image.Image) else image
    pixels = np.asarray(upright(img, chans))
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    pixels = eval_resize(pixels, size, resize_cfg.get("policy", "small"), resize_cfg.get("crop_pct", 0.875))
    return normalize(pixels, _value(meta, "mean"), _value(meta, "std"))
