"""Putting it together: training and validation loaders for a built-in name or an ImageNet-layout folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .builtin import BUILTIN, load_builtin
from .config import SMALL_MAX, DataConfig, DataError
from .folders import eval_folder, find_splits
from .images import resize_uint8
from .loaders import FolderDataset, StreamLoader, TensorLoader, decode_folder

MEMORY_LIMIT_BYTES = 3 << 30  # largest decoded dataset held in memory


@dataclass
class Data:
    """Everything the engine needs: loaders (per process), class names and the recorded transform."""

    train: Any
    val: Any
    class_names: list[str]
    cfg: DataConfig
    description: str
    skipped_files: dict[str, str] = field(default_factory=dict)  # decoded into memory: path -> error

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def all_skipped(self) -> dict[str, str]:
        """Every unreadable file skipped so far (decoding, and each streamed loader), each once."""
        out = dict(self.skipped_files)
        for loader in (self.train, self.val):
            out.update(getattr(loader, "skipped_files", {}))
        return out


def _fits_memory(n: int, cfg: DataConfig) -> bool:
    return n * max(cfg.in_chans, 3) * cfg.img_size**2 <= MEMORY_LIMIT_BYTES


def build_data(
    data: str,
    cfg: DataConfig,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    data_root: str | None = None,
    download: bool = False,
    skip_bad: bool = False,
    cache: str = "auto",
    device: torch.device | str = "cpu",
) -> Data:
    """Build training and validation loaders for ``data`` (a built-in name or an ImageNet-layout folder).

    ``batch_size`` is per process. Small-policy data that fits in memory is decoded once and augmented
    on tensors (``cache='auto'``/``'memory'``); otherwise images stream through DataLoader workers.
    """
    key = data.lower()
    if key in ("fashion_mnist", "fashionmnist"):
        key = "fashion-mnist"
    if key in BUILTIN:
        if cfg.policy != "small":
            raise DataError(f"--data {data} holds 28-32 px images; use --img-size {SMALL_MAX} or less")
        d = load_builtin(key, data_root, download)
        (xt, yt), (xv, yv) = d["train"], d["val"]
        xt, xv = _resize_in_chunks(xt, cfg.img_size), _resize_in_chunks(xv, cfg.img_size)
        if cfg.in_chans == 1 and xt.shape[1] == 3:
            raise DataError(f"--in-chans 1 needs greyscale data; {data} is RGB (use --in-chans 3)")
        train = TensorLoader(xt, yt, batch_size, cfg, True, seed, rank, world)
        val = TensorLoader(xv, yv, eval_batch_size, cfg, False, seed, rank, world)
        desc = f"{key}: {len(yt)} training / {len(yv)} test images, {len(d['class_names'])} classes"
        return Data(train.to(device), val.to(device), d["class_names"], cfg, desc)

    train_split, val_split = find_splits(data)
    n = len(train_split.samples) + len(val_split.samples)
    use_memory = cfg.policy == "small" and (cache == "memory" or (cache == "auto" and _fits_memory(n, cfg)))
    skipped: dict[str, str] = {}
    if use_memory:
        xt, yt, s1 = decode_folder(train_split, cfg, workers, skip_bad)
        xv, yv, s2 = decode_folder(val_split, cfg, workers, skip_bad)
        skipped = {**s1, **s2}
        if xt.shape[1] != xv.shape[1]:
            c = max(xt.shape[1], xv.shape[1])
            xt, xv = xt.expand(-1, c, -1, -1).contiguous(), xv.expand(-1, c, -1, -1).contiguous()
        if len(yt) < batch_size * world:
            raise DataError(
                f"{train_split.root} has {len(yt)} readable images, fewer than one batch of "
                f"{batch_size * world}; lower --batch-size"
            )
        train = TensorLoader(xt, yt, batch_size, cfg, True, seed, rank, world).to(device)
        val = TensorLoader(xv, yv, eval_batch_size, cfg, False, seed, rank, world).to(device)
    else:
        if len(train_split.samples) < batch_size * world:
            raise DataError(
                f"{train_split.root} has {len(train_split.samples)} images, fewer than one batch of "
                f"{batch_size * world}; lower --batch-size"
            )
        pin = torch.device(device).type == "cuda"
        train = StreamLoader(
            FolderDataset(train_split.samples, cfg, True), batch_size, True, workers, seed, rank, world, skip_bad, pin
        )
        val = StreamLoader(
            FolderDataset(val_split.samples, cfg, False), eval_batch_size, False, workers, seed, rank, world,
            skip_bad, pin,
        )  # fmt: skip
    desc = (
        f"{data}: {len(train_split.samples)} training / {len(val_split.samples)} validation images, "
        f"{len(train_split.class_names)} classes ({'decoded into memory' if use_memory else 'streamed'})"
    )
    return Data(train, val, train_split.class_names, cfg, desc, skipped)


def build_eval_loader(
    data: str,
    cfg: DataConfig,
    batch_size: int,
    workers: int,
    data_root: str | None = None,
    download: bool = False,
    skip_bad: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Any, list[str], str]:
    """The evaluation loader of ``micronet eval``: a built-in test split or a class-folder tree
    (``DIR/val`` when present), through exactly the training run's evaluation transform."""
    key = data.lower()
    if key in ("fashion_mnist", "fashionmnist"):
        key = "fashion-mnist"
    if key in BUILTIN:
        d = load_builtin(key, data_root, download)
        xv, yv = d["val"]
        xv = _resize_in_chunks(xv, cfg.img_size)
        loader = TensorLoader(xv, yv, batch_size, cfg, False).to(device)
        return loader, d["class_names"], f"{key} test split ({len(yv)} images)"
    split = eval_folder(data)
    if cfg.policy == "small" and _fits_memory(len(split.samples), cfg):
        xv, yv, skipped = decode_folder(split, cfg, workers, skip_bad)
        loader = TensorLoader(xv, yv, batch_size, cfg, False).to(device)
        loader.skipped, loader.skipped_files = len(skipped), skipped
    else:
        skipped = {}
        loader = StreamLoader(FolderDataset(split.samples, cfg, False), batch_size, False, workers, skip_bad=skip_bad)
    note = f", {len(skipped)} unreadable skipped" if skipped else ""
    return loader, split.class_names, f"{split.root} ({len(split.samples)} images{note})"


def _resize_in_chunks(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.cat([resize_uint8(x[i : i + chunk], size) for i in range(0, len(x), chunk)])
