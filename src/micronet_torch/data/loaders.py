"""Loaders: in-memory uint8 datasets augmented on whole batches, and streamed folders through DataLoader workers.

Every loader yields ``uint8`` batches (N, C, H, W) plus labels, shuffles with a function of (seed, epoch) only
and shards by rank, so a resumed or distributed run sees exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig, DataError
from .folders import ImageFolderSplit
from .images import augment_batch, eval_pixels, open_image


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of epoch ``epoch``: a function of (seed, epoch) only, so a resumed run repeats it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def shard(indices: torch.Tensor, batch_size: int, rank: int, world: int, drop_last: bool) -> torch.Tensor:
    """This rank's share: training keeps whole global batches (drop_last), evaluation every sample once."""
    if drop_last:
        global_batch = batch_size * world
        usable = (len(indices) // global_batch) * global_batch
        indices = indices[:usable]
    return indices[rank::world]


class TensorLoader:
    """Batches of an in-memory uint8 dataset: per-epoch shuffle, rank sharding, batch augmentation.

    ``batch_size`` is per process. Training batches follow ``epoch_permutation``; the augmentation
    draws from ``generator`` (its state is checkpointed, so resuming mid-epoch repeats it too).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        cfg: DataConfig,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        self.images, self.targets = images, targets
        self.batch_size, self.cfg, self.train = batch_size, cfg, train
        self.seed, self.rank, self.world = seed, rank, world
        self.device = torch.device(device)
        self.epoch = 0
        self.generator = torch.Generator()
        self.skipped = 0
        self.skipped_files: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) * 97 + self.rank + 1)

    def to(self, device: torch.device | str) -> TensorLoader:
        """Keep the dataset on ``device`` (a GPU holds Fashion-MNIST or CIFAR easily)."""
        self.device = torch.device(device)
        self.images, self.targets = self.images.to(self.device), self.targets.to(self.device)
        return self

    def _indices(self) -> torch.Tensor:
        n = len(self.targets)
        order = epoch_permutation(n, self.seed, self.epoch) if self.train else torch.arange(n)
        return shard(order, self.batch_size, self.rank, self.world, drop_last=self.train)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from batch ``start`` on (a resumed epoch skips the batches it already trained on)."""
        idx = self._indices().to(self.images.device)
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x, y = self.images[sel], self.targets[sel]
            if self.train:
                x = augment_batch(x, self.cfg, self.generator)
            yield x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)


class ListSampler(Sampler[int]):
    """Yields fixed indices; with ``set_epoch`` a per-epoch (seed, epoch) shuffle sharded by rank."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.train = n, batch_size, train
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def _indices(self) -> torch.Tensor:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.train else torch.arange(self.n)
        return shard(order, self.batch_size, self.rank, self.world, drop_last=self.train)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start * self.batch_size :].tolist())

    def __len__(self) -> int:
        return len(self._indices()) - self.start * self.batch_size


class FolderDataset(Dataset):
    """(path, label) samples read with ``open_image``; returns uint8 tensors. Unreadable files come back
    as ``None`` with ``(path, error)``, so the loader can skip them (``--skip-bad-images``) or stop with the
    file's name in the main process: the same one-line message with DataLoader workers as without."""

    def __init__(self, samples: Sequence[tuple[str, int]], cfg: DataConfig, train: bool) -> None:
        self.samples, self.cfg, self.train = list(samples), cfg, train
        self.transform = build_crop_train_transform(cfg) if train and cfg.policy == "crop" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        path, target = self.samples[i]
        try:
            img = open_image(path, 1 if self.cfg.in_chans == 1 else 3, self.cfg.max_image_pixels)
        except DataError as err:
            return None, target, (str(path), str(err))
        if self.transform is not None:
            return self.transform(img), target, None
        x = eval_pixels(img, self.cfg)
        return x, target, None


def build_crop_train_transform(cfg: DataConfig):
    """ImageNet-style training transform (torchvision v2): RandomResizedCrop + flip, uint8 output."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(
                cfg.img_size, scale=cfg.scale, interpolation=InterpolationMode.BILINEAR, antialias=True
            ),
            v2.RandomHorizontalFlip(cfg.hflip),
        ]
    )


BAD_IMAGE_HINT = "Fix or delete the file, or pass --skip-bad-images to skip unreadable images."


class BadImages:
    """Collate that sets unreadable images aside: returns the good ones stacked and the bad ones' (path, error).

    It never raises: a collate function runs inside DataLoader workers, where an exception would reach the
    user wrapped in the worker's traceback. ``raise_bad`` (in the main process) raises or counts instead.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip

    def __call__(
        self, batch: list[tuple[torch.Tensor | None, int, tuple[str, str] | None]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        good = [(x, y) for x, y, _ in batch if x is not None]
        bad = [err for x, _, err in batch if x is None and err is not None]
        if not good:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
        chans = max(x.shape[0] for x, _ in good)
        xs = [x.expand(chans, -1, -1) if x.shape[0] != chans else x for x, _ in good]
        return torch.stack(xs), torch.tensor([y for _, y in good]), bad


def raise_bad(bad: list[tuple[str, str]], skip: bool, seen: dict[str, str]) -> None:
    """In the main process: stop with the first bad file's one-line message, or record each file once in ``seen``."""
    if bad and not skip:
        raise DataError(f"{bad[0][1]}\n{BAD_IMAGE_HINT}")
    for path, err in bad:
        seen.setdefault(path, err)


class StreamLoader:
    """DataLoader over a ``FolderDataset`` with deterministic per-epoch shuffling and worker seeds."""

    def __init__(
        self,
        dataset: FolderDataset,
        batch_size: int,
        train: bool,
        workers: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        skip_bad: bool = False,
        pin_memory: bool = False,
    ) -> None:
        self.train, self.seed, self.rank = train, seed, rank
        self.sampler = ListSampler(len(dataset), batch_size, train, seed, rank, world)
        self.batch_size = batch_size
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=BadImages(skip_bad),
            drop_last=train,
            pin_memory=pin_memory,
            generator=self.generator,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        self.skip_bad = skip_bad
        self.skipped_files: dict[str, str] = {}  # path -> error, each file once however many epochs

    @property
    def skipped(self) -> int:
        """Unreadable files skipped so far (files, not occurrences)."""
        return len(self.skipped_files)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) * 97 + self.rank + 1)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.start = start
        try:
            for x, y, bad in self.loader:
                raise_bad(bad, self.skip_bad, self.skipped_files)
                if len(y) == 0 or (self.train and len(y) < 2):
                    continue  # nothing left after skipping bad images (BatchNorm needs two samples)
                yield x, y
        finally:
            self.sampler.start = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)


def decode_folder(
    split: ImageFolderSplit, cfg: DataConfig, workers: int, skip_bad: bool
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Decode a whole folder through the eval transform into one uint8 tensor (parallel workers).

    Returns the images, labels and the skipped files (path -> error) when ``skip_bad``.
    """
    ds = FolderDataset(split.samples, cfg, train=False)
    loader = DataLoader(
        ds,
        batch_size=256,
        num_workers=workers if len(ds) > 2000 else 0,
        collate_fn=BadImages(skip_bad),
    )
    xs, ys, skipped = [], [], {}
    for x, y, bad in loader:
        raise_bad(bad, skip_bad, skipped)
        if len(y):
            xs.append(x)
            ys.append(y)
    if not xs:
        raise DataError(f"no readable image in {split.root}")
    chans = max(x.shape[1] for x in xs)
    xs = [x.expand(-1, chans, -1, -1) if x.shape[1] != chans else x for x in xs]
    return torch.cat(xs), torch.cat(ys), skipped
