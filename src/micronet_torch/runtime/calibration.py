"""Images for int8 calibration and parity checks: a folder, Fashion-MNIST, or smooth synthetic noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import IMG_EXTENSIONS, DataError, eval_pixels, load_builtin, normalize, open_image, resize_uint8


def calibration_images(
    calib: str,
    cfg: Any,
    limit: int | None = None,
    split: str = "val",
    skip_bad: bool = False,
    skipped: dict[str, str] | None = None,
) -> tuple[torch.Tensor, str]:
    """Normalised float images (N, C, H, W) from an image folder or ``fashion-mnist`` (its ``split``).

    A folder with a ``train/`` subfolder (an ImageNet-layout tree) is read from there, and the description
    says so; otherwise every image under the folder. Returns the images and what was read; with ``skip_bad``
    unreadable files are skipped and recorded in ``skipped`` (path -> error), else the first one stops with its
    name.
    """
    skipped = {} if skipped is None else skipped
    if calib == "fashion-mnist":
        data = load_builtin("fashion-mnist", None, download=False)
        x = data[split][0]
        if limit:
            x = x[:limit]
        x = resize_uint8(x, cfg.img_size)
        what = f"Fashion-MNIST {'test' if split == 'val' else 'training'} images"
    else:
        root = Path(calib)
        if not root.is_dir():
            raise FileNotFoundError(f"calibration folder {calib!r} does not exist (give a folder or fashion-mnist)")
        if (root / "train").is_dir():
            root = root / "train"
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ValueError(f"no images under {root}")
        chans = 1 if cfg.in_chans == 1 else 3
        images = []
        for p in files:
            if limit and len(images) >= limit:
                break
            try:
                x = eval_pixels(open_image(p, chans, cfg.max_image_pixels), cfg)
                images.append(x.expand(chans, -1, -1) if len(x) != chans else x)  # grey among RGB: as training
            except DataError as err:
                if not skip_bad:
                    raise DataError(f"{err}\nFix or delete the file, or pass --skip-bad-images") from err
                skipped[str(p)] = str(err)
        if not images:
            raise DataError(f"no readable image under {root}")
        x = torch.stack(images)
        what = f"images of {root}" + (f" ({len(skipped)} unreadable skipped)" if skipped else "")
    out = torch.cat([normalize(x[i : i + 1024], cfg) for i in range(0, len(x), 1024)])
    return out, f"{len(out)} {what}"


def synthetic_images(n: int, in_chans: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise, roughly unit variance) for calibration without data."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, in_chans, max(2, img_size // 16), max(2, img_size // 16), generator=g)
    x = nn.functional.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x + 0.25 * torch.randn(x.shape, generator=g)
