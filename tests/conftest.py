"""Shared fixtures (tiny image folders, a trained run, a tiny Fashion-MNIST), one native-library cache for the
whole test run, and the isolation of the deployment-runtime tests (``isolation.py``)."""

from __future__ import annotations

import os

# One OpenMP thread per test process, set before torch loads: two xdist workers on two cores, each with a
# thread pool of two that spins between ops, take turns on a core (a run's child processes inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gzip
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from isolation import configure as configure_isolation
from isolation import (  # noqa: F401  (hooks: pytest finds them in the conftest's namespace)
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_itemcollected,
    pytest_runtest_logreport,
    pytest_runtest_protocol,
)
from PIL import Image

from micronet_torch.cli import main as cli_main

CACHE_ENV = "MICRONET_TORCH_HOME"

CLASSES = ("circle", "cross", "stripes")


def class_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A learnable grey picture: each class its own shape, with noise and jitter."""
    img = rng.integers(0, 40, (size, size)).astype(np.uint8)
    c = size // 2 + int(rng.integers(-1, 2))
    yy, xx = np.mgrid[:size, :size]
    if label == 0:
        img[(yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2] = 220
    elif label == 1:
        img[c - 1 : c + 1, :] = 220
        img[:, c - 1 : c + 1] = 220
    else:
        img[::4, :] = 220
    return img


def make_folder(root: Path, n_train: int = 8, n_val: int = 4, classes=CLASSES, size: int = 16, seed: int = 0) -> Path:
    """An ImageNet-layout folder: root/{train,val}/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for label, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_image(label, rng, size)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 8 training and 4 validation 16-px greyscale PNGs each."""
    return make_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A 2-epoch MicroNet-M0 run on ``tiny_folder`` that the eval, predict and convert tests read (never write)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    args = ["train", "--data", str(tiny_folder), "--img-size", "20", "--epochs", "2", "--batch-size", "6"]
    assert cli_main([*args, "--workers", "0", "--output", str(out), "--quiet"]) == 0
    return out


def _idx(arr: np.ndarray) -> bytes:
    code = 0x08
    header = struct.pack(">HBB", 0, code, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Debian-style gzipped IDX files (200 training, 60 test images) and an empty cache home."""
    rng = np.random.default_rng(1)
    src = tmp_path / "debian"
    src.mkdir()
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = np.stack([np.pad(class_image(int(lbl) % 3, rng, 24), 2) for lbl in labels])
        (src / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (src / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    monkeypatch.setattr("micronet_torch.data.builtin.FASHION_MNIST_DEBIAN", src)
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "home"))
    return src


def pytest_configure(config: pytest.Config) -> None:
    """One cache home for the whole run, made by the first process (xdist's workers and the runtime tests' child
    processes inherit it), so every C / C++ library is compiled once per test run and never into ~/.cache."""
    configure_isolation(config)
    if not os.environ.get("MICRONET_TEST_HOME"):
        home = tempfile.mkdtemp(prefix="micronet-test-home-")
        os.environ["MICRONET_TEST_HOME"] = home
        config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    os.environ[CACHE_ENV] = os.environ["MICRONET_TEST_HOME"]
