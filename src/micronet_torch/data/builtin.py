"""The built-in datasets: Fashion-MNIST (from Debian's files, never downloaded), CIFAR-10/100 (torchvision)."""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch

from .._env import cache_root
from .._text import one_line
from .config import DataError

BUILTIN = ("fashion-mnist", "cifar10", "cifar100")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
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
    return cache_root() / "data"


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
            except (OSError, EOFError, zlib.error) as err:  # a disk error, or a cut or corrupt .gz
                raise DataError(
                    f"cannot unpack Fashion-MNIST from {src} into {raw} ({one_line(err, 200)}); pass --data-root DIR"
                ) from err
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
        raw = root / "FashionMNIST" / "raw"
        try:  # torchvision checks the IDX headers with assert statements
            tr, te = tvd.FashionMNIST(str(root), train=True), tvd.FashionMNIST(str(root), train=False)
            intact = all(len(d.data) == len(d.targets) > 0 and int(d.targets.max()) < 10 for d in (tr, te))
        except (AssertionError, RuntimeError, ValueError, IndexError, OSError) as err:
            intact, why = False, f" ({one_line(err, 200)})" if str(err) else ""
        else:
            why = " (the image and label counts differ, or a label is not 0-9)"
        if not intact:
            raise DataError(
                f"Fashion-MNIST in {raw} is not readable: its IDX files are cut or corrupt{why}; delete them (they "
                "are unpacked again from Debian's files) or give --data-root a folder with intact ones"
            )
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
