"""Reading single images and the per-image / per-batch pixel transforms shared by every pipeline.

Pipelines yield ``uint8`` batches (N, C, H, W); normalisation, the grey-to-RGB expansion and (for small
images) the augmentation run on whole batches on the training device, which keeps 2-core CPUs busy with the
model rather than with per-image Python and moves 4x fewer bytes to a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import DataConfig, DataError, channel_stats
from .preprocess import eval_resize, upright
from .scan import ImageFileError, open_image_safely

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def open_image(path: str | os.PathLike, in_chans: int = 3, max_pixels: int | None = None) -> Image.Image:
    """Read an image fully, upright, as 'L' (greyscale, or ``in_chans == 1``) or 'RGB'; errors name the file.

    The EXIF orientation is applied (a phone photo is seen as every viewer shows it, not as stored).
    Grey, 16-bit, palette, RGBA/LA (alpha dropped) and CMYK images are converted. A truncated or
    unreadable file, a FIFO or device, or an image of more than ``max_pixels`` pixels (a decompression
    bomb; default PIL's limit, ``DataConfig.max_image_pixels``; 0 for none) raises ``DataError``, which
    ``--skip-bad-images`` skips.
    """
    try:
        with open_image_safely(path, max_pixels) as opened:
            return upright(opened, 1 if in_chans == 1 else 3)
    except ImageFileError as err:
        raise DataError(str(err)) from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


def image_to_uint8(img: Image.Image) -> torch.Tensor:
    """A PIL 'L' or 'RGB' image as a (C, H, W) uint8 tensor."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_uint8(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (C, H, W) or (N, C, H, W) to ``size``; one implementation
    for the in-memory datasets, the folder pipeline and ``predict``, so their pixels agree exactly."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    single = x.ndim == 3
    if single:
        x = x[None]
    if tuple(x.shape[-2:]) != size:
        y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    return x[0] if single else x


def eval_pixels(img: Image.Image, cfg: DataConfig) -> torch.Tensor:
    """The deterministic evaluation transform of one image: uint8 (C, img_size, img_size)."""
    pixels = np.asarray(img, dtype=np.uint8)
    pixels = eval_resize(pixels[:, :, None] if pixels.ndim == 2 else pixels, cfg.img_size, cfg.policy, cfg.crop_pct)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def normalize(x: torch.Tensor, cfg: DataConfig, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch to the model's float input: scale, expand grey to ``in_chans``, mean/std."""
    x = x.float().div_(255.0)
    if x.shape[1] != cfg.in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, cfg.in_chans, -1, -1)
        elif cfg.in_chans == 1:  # RGB data for a 1-channel model: ITU-R 601 luma, as PIL's convert('L')
            w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        else:
            raise DataError(f"images have {x.shape[1]} channels but the model takes {cfg.in_chans}")
    mean, std = channel_stats(cfg.mean, cfg.in_chans), channel_stats(cfg.std, cfg.in_chans)
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def augment_batch(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Small-image training augmentation on a uint8 batch: random translation by up to ``pad`` pixels
    (zero padding + crop, as for CIFAR) and horizontal flip with probability ``hflip``."""
    n, _, h, w = x.shape
    p = cfg.padding
    dev = x.device
    if p > 0:
        xp = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(dev)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None]).view(n, 1, h, 1).expand(-1, xp.shape[1], -1, w + 2 * p)
        xp = xp.gather(2, rows)
        cols = (ox[:, None] + torch.arange(w, device=dev)[None]).view(n, 1, 1, w).expand(-1, xp.shape[1], h, -1)
        x = xp.gather(3, cols)
    if cfg.hflip > 0:
        flip = (torch.rand(n, generator=generator) < cfg.hflip).to(dev).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x
