"""Datasets and transforms for training and evaluation: image folders, Fashion-MNIST, CIFAR.

Every pipeline yields ``uint8`` batches (N, C, H, W) plus labels; normalisation, the grey-to-RGB
expansion and (for small images) the augmentation run on whole batches on the training device, which
keeps 2-core CPUs busy with the model rather than with per-image Python and moves 4x fewer bytes to a
GPU. Two eval transforms exist and are recorded in checkpoints so that ``micronet eval`` and
``micronet predict`` apply exactly what training evaluated:

- ``small`` (images of at most 64 px): resize the whole image to ``img_size`` x ``img_size``;
  training adds random translation (zero padding + random crop) and horizontal flips on tensors.
- ``crop`` (ImageNet style): resize the shorter side to ``img_size / crop_pct``, centre crop;
  training uses torchvision's ``RandomResizedCrop`` + flip per image in DataLoader workers.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BUILTIN = ("fashion-mnist", "cifar10", "cifar100")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
SMALL_MAX = 64  # img sizes up to this use the small-image pipeline
MEMORY_LIMIT_BYTES = 3 << 30  # largest decoded dataset held in memory


class DataError(ValueError):
    """A data problem the user can fix; the message names the folder, file or flag."""


# ---- the recorded evaluation transform ----------------------------------------------------------
@dataclass
class DataConfig:
    """How images become model inputs; stored in checkpoints so evaluation repeats it exactly."""

    img_size: int = 32
    in_chans: int = 3
    policy: str = "small"  # 'small' (resize whole image) or 'crop' (resize shorter side, centre crop)
    crop_pct: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # training-only augmentation
    hflip: float = 0.5
    pad: int = -1  # small policy: translation in px (-1: img_size // 8)
    scale: tuple[float, float] = (0.08, 1.0)  # crop policy: RandomResizedCrop area range

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["scale"] = list(self.mean), list(self.std), list(self.scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "scale"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    @property
    def padding(self) -> int:
        return self.img_size // 8 if self.pad < 0 else self.pad

    @property
    def resize_size(self) -> int:
        return math.floor(self.img_size / self.crop_pct)


def default_policy(img_size: int) -> str:
    return "small" if img_size <= SMALL_MAX else "crop"


# ---- reading single images ------------------------------------------------------------------------
def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8-bit 'L' by scaling (PIL's own convert clips at 255)."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float32)
        hi = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255)
    else:
        arr = arr.astype(np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255)
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike, in_chans: int = 3) -> Image.Image:
    """Read an image fully, as 'L' (greyscale, or ``in_chans == 1``) or 'RGB'; errors name the file.

    Grey, 16-bit, palette, RGBA/LA (alpha dropped) and CMYK images are converted; a truncated or
    unreadable file raises ``DataError``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("I", "F") or mode.startswith("I;16"):
                img = _to_8bit(img)
            elif mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            if img.mode in ("1", "LA", "La"):
                img = img.convert("L")
            if in_chans == 1:
                return img.convert("L") if img.mode != "L" else img.copy()
            if img.mode == "L":
                return img.copy()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
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
    x = image_to_uint8(img)
    if cfg.policy == "small":
        return resize_uint8(x, cfg.img_size)
    h, w = x.shape[-2:]
    short = cfg.resize_size
    size = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    x = resize_uint8(x, size)
    top, left = (size[0] - cfg.img_size) // 2, (size[1] - cfg.img_size) // 2
    return x[:, top : top + cfg.img_size, left : left + cfg.img_size].contiguous()


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
    mean, std = _stats(cfg.mean, cfg.in_chans), _stats(cfg.std, cfg.in_chans)
    mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def _stats(values: Sequence[float], chans: int) -> list[float]:
    values = list(values)
    if len(values) == chans:
        return values
    if chans == 1:
        return [sum(values) / len(values)]
    return (values * chans)[:chans] if len(values) == 1 else values[:chans]


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


# ---- samplers and loaders -------------------------------------------------------------------------
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
    as ``None`` with the error, so the collate function can skip them (``--skip-bad-images``) or stop
    with the file's name, in the main process, without a worker traceback."""

    def __init__(self, samples: Sequence[tuple[str, int]], cfg: DataConfig, train: bool) -> None:
        self.samples, self.cfg, self.train = list(samples), cfg, train
        self.transform = build_crop_train_transform(cfg) if train and cfg.policy == "crop" else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        path, target = self.samples[i]
        try:
            img = open_image(path, 1 if self.cfg.in_chans == 1 else 3)
        except DataError as err:
            return None, target, str(err)
        if self.transform is not None:
            return self.transform(img), target, ""
        x = eval_pixels(img, self.cfg)
        return x, target, ""


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


class BadImages:
    """Collate that drops unreadable images (counting them) or raises ``DataError`` naming the file."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip

    def __call__(self, batch: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        good = [(x, y) for x, y, _ in batch if x is not None]
        bad = [err for x, _, err in batch if x is None]
        if bad and not self.skip:
            raise DataError(f"{bad[0]}\nFix or delete the file, or pass --skip-bad-images to skip unreadable images.")
        if not good:
            return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), len(bad)
        chans = max(x.shape[0] for x, _ in good)
        xs = [x.expand(chans, -1, -1) if x.shape[0] != chans else x for x, _ in good]
        return torch.stack(xs), torch.tensor([y for _, y in good]), len(bad)


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
        self.skipped = 0

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
                self.skipped += bad
                if len(y) == 0 or (self.train and len(y) < 2):
                    continue  # nothing left after skipping bad images (BatchNorm needs two samples)
                yield x, y
        finally:
            self.sampler.start = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)


# ---- finding data -----------------------------------------------------------------------------------
@dataclass
class ImageFolderSplit:
    """One class-folder tree: sorted class names and (path, label) samples."""

    root: Path
    class_names: list[str]
    samples: list[tuple[str, int]] = field(repr=False)


def scan_folder(root: str | os.PathLike, what: str = "data folder") -> ImageFolderSplit:
    """Class subfolders of ``root`` and their images (any depth), with clear errors when empty."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS][:3]
        hint = f" (it holds images directly, e.g. {', '.join(loose)})" if loose else ""
        raise DataError(
            f"{what} {root} has no class subfolders{hint}; put each class's images in a subfolder: "
            f"{root}/<class name>/<image>"
        )
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
        if not found:
            empty.append(name)
        samples.extend((p, label) for p in found)
    if not samples:
        raise DataError(
            f"{what} {root} has class subfolders ({', '.join(classes[:5])}) but no images in them "
            f"(looked for {', '.join(IMG_EXTENSIONS)})"
        )
    if empty:
        raise DataError(
            f"{what} {root}: class folder(s) {', '.join(empty[:5])} hold no images; add images or remove them"
        )
    return ImageFolderSplit(root, classes, samples)


def find_splits(root: str | os.PathLike) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """``root/train`` and ``root/val`` (ImageNet layout), checked to hold the same classes."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"--data {root} does not exist (expected a folder with train/ and val/ inside)")
    if not root.is_dir():
        raise DataError(f"--data {root} is not a folder")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"--data {root} has no {' or '.join(s + '/' for s in missing)} folder; expected "
            f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (the ImageNet layout)"
        )
    train, val = scan_folder(root / "train", "training folder"), scan_folder(root / "val", "validation folder")
    if train.class_names != val.class_names:
        only_t = sorted(set(train.class_names) - set(val.class_names))
        only_v = sorted(set(val.class_names) - set(train.class_names))
        raise DataError(
            f"train/ and val/ of {root} have different classes: only in train/: {only_t[:5] or 'none'}; "
            f"only in val/: {only_v[:5] or 'none'}; both need the same class subfolders"
        )
    return train, val


def eval_folder(root: str | os.PathLike) -> ImageFolderSplit:
    """The class-folder tree evaluated by ``micronet eval``: ``root/val`` when it exists, else ``root``."""
    root = Path(root)
    if (root / "val").is_dir():
        return scan_folder(root / "val", "validation folder")
    return scan_folder(root, "data folder")


# ---- built-in datasets -------------------------------------------------------------------------------
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def data_home() -> Path:
    """Where datasets are cached: ``$MICRONET_TORCH_HOME/data`` or ``~/.cache/micronet_torch/data``."""
    return Path(os.environ.get("MICRONET_TORCH_HOME", Path.home() / ".cache" / "micronet_torch")) / "data"


def prepare_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """A torchvision root holding ``FashionMNIST/raw``: use it if complete, else decompress Debian's
    gzipped IDX files into it once. Never downloads."""
    root = Path(root) if root else data_home()
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_MNIST_FILES):
        return root
    sources = [raw, FASHION_MNIST_DEBIAN]
    for src in sources:
        if all((src / (f + ".gz")).is_file() for f in FASHION_MNIST_FILES):
            try:
                raw.mkdir(parents=True, exist_ok=True)
                for f in FASHION_MNIST_FILES:
                    tmp = raw / f".{f}.part{os.getpid()}"
                    with gzip.open(src / (f + ".gz"), "rb") as fin, open(tmp, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                    os.replace(tmp, raw / f)
            except OSError as err:
                raise DataError(f"cannot unpack Fashion-MNIST into {raw} ({err}); pass --data-root DIR") from err
            return root
    raise DataError(
        f"Fashion-MNIST not found: neither {raw} nor {FASHION_MNIST_DEBIAN} holds its four IDX files. "
        "Install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or put "
        f"{', '.join(FASHION_MNIST_FILES)} (optionally .gz) in {raw}"
    )


def load_builtin(name: str, root: str | os.PathLike | None, download: bool) -> dict[str, Any]:
    """Fashion-MNIST / CIFAR-10 / CIFAR-100 through torchvision as uint8 tensors (N, C, H, W)."""
    import torchvision.datasets as tvd

    if name == "fashion-mnist":
        root = prepare_fashion_mnist(root)
        tr, te = tvd.FashionMNIST(str(root), train=True), tvd.FashionMNIST(str(root), train=False)
        return dict(
            train=(tr.data[:, None].contiguous(), tr.targets.long()),
            val=(te.data[:, None].contiguous(), te.targets.long()),
            class_names=list(FASHION_MNIST_CLASSES),
        )
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    root = Path(root) if root else data_home()
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        if download:
            raise DataError(f"could not download {name} into {root}: {err}") from err
        raise DataError(
            f"{name} is not in {root} (torchvision's layout); pass --download to fetch it once, or "
            f"--data-root DIR where it already is"
        ) from err

    def to_tensor(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return dict(train=to_tensor(tr), val=to_tensor(te), class_names=list(tr.classes))


def decode_folder(
    split: ImageFolderSplit, cfg: DataConfig, workers: int, skip_bad: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode a whole folder through the eval transform into one uint8 tensor (parallel workers)."""
    ds = FolderDataset(split.samples, cfg, train=False)
    loader = DataLoader(
        ds,
        batch_size=256,
        num_workers=workers if len(ds) > 2000 else 0,
        collate_fn=BadImages(skip_bad),
    )
    xs, ys, skipped = [], [], 0
    for x, y, bad in loader:
        skipped += bad
        if len(y):
            xs.append(x)
            ys.append(y)
    if not xs:
        raise DataError(f"no readable image in {split.root}")
    chans = max(x.shape[1] for x in xs)
    xs = [x.expand(-1, chans, -1, -1) if x.shape[1] != chans else x for x in xs]
    return torch.cat(xs), torch.cat(ys), skipped


# ---- putting it together -----------------------------------------------------------------------------
@dataclass
class Data:
    """Everything the engine needs: loaders (per process), class names and the recorded transform."""

    train: Any
    val: Any
    class_names: list[str]
    cfg: DataConfig
    description: str
    skipped: int = 0


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
    skipped = 0
    if use_memory:
        xt, yt, s1 = decode_folder(train_split, cfg, workers, skip_bad)
        xv, yv, s2 = decode_folder(val_split, cfg, workers, skip_bad)
        skipped = s1 + s2
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
    else:
        skipped = 0
        loader = StreamLoader(FolderDataset(split.samples, cfg, False), batch_size, False, workers, skip_bad=skip_bad)
    note = f", {skipped} unreadable skipped" if skipped else ""
    return loader, split.class_names, f"{split.root} ({len(split.samples)} images{note})"


def _resize_in_chunks(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.cat([resize_uint8(x[i : i + chunk], size) for i in range(0, len(x), chunk)])


def default_workers() -> int:
    """DataLoader workers when not given: the cores this process may use, less one for the model, max 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))
