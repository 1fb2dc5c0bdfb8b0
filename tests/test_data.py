"""Data pipeline: folder checks, image conversions, tensor augmentation, sharding, Fashion-MNIST."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from micronet_torch import data as D


# ---- folders -------------------------------------------------------------------------------------
def test_find_splits_reads_imagenet_layout(tiny_folder: Path) -> None:
    train, val = D.find_splits(tiny_folder)
    assert train.class_names == val.class_names == ["circle", "cross", "stripes"]
    assert len(train.samples) == 24 and len(val.samples) == 12


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("no_splits", "has no train/ or val/ folder"),
        ("no_classes", "no class subfolders"),
        ("empty_classes", "no images in them"),
        ("one_empty_class", "hold no images"),
        ("different_classes", "different classes"),
    ],
)
def test_bad_folders_are_explained(tmp_path: Path, tiny_folder: Path, layout: str, message: str) -> None:
    root = tmp_path / "d"
    if layout == "no_splits":
        root.mkdir()
    elif layout == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
        Image.new("L", (8, 8)).save(root / "train" / "loose.png")
    elif layout == "empty_classes":
        for s in ("train", "val"):
            (root / s / "a").mkdir(parents=True)
    elif layout in ("one_empty_class", "different_classes"):
        shutil.copytree(tiny_folder, root)
        if layout == "one_empty_class":
            (root / "train" / "empty").mkdir()
            (root / "val" / "empty").mkdir()
        else:
            shutil.rmtree(root / "val" / "cross")
    with pytest.raises(D.DataError, match=message):
        D.find_splits(root)


def test_eval_folder_prefers_val(tiny_folder: Path) -> None:
    assert D.eval_folder(tiny_folder).root == tiny_folder / "val"
    assert D.eval_folder(tiny_folder / "train").root == tiny_folder / "train"


# ---- images -----------------------------------------------------------------------------------------
def test_image_modes_are_converted(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (10, 6), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("P", (10, 6)).save(tmp_path / "pal.png")
    Image.new("L", (10, 6), 7).save(tmp_path / "grey.png")
    Image.fromarray(np.full((6, 10), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert D.open_image(tmp_path / "rgba.png").mode == "RGB"
    assert D.open_image(tmp_path / "pal.png").mode == "RGB"
    assert D.open_image(tmp_path / "grey.png").mode == "L"  # grey stays 1 channel; expanded on the batch
    assert D.open_image(tmp_path / "rgba.png", in_chans=1).mode == "L"
    deep = D.open_image(tmp_path / "deep.png")
    assert deep.mode == "L" and np.asarray(deep).max() == 255  # scaled, not clipped garbage
    half = np.full((6, 10), 32768, np.uint16)
    Image.fromarray(half).save(tmp_path / "half.png")
    assert abs(int(np.asarray(D.open_image(tmp_path / "half.png")).mean()) - 128) <= 1


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for name in ("cut.jpg", "junk.png"):
        with pytest.raises(D.DataError, match=re.escape(name)):
            D.open_image(tmp_path / name)


def test_eval_pixels_small_and_crop_policies() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    small = D.eval_pixels(img, D.DataConfig(img_size=32, policy="small"))
    assert small.shape == (3, 32, 32) and small.dtype == torch.uint8
    tiny = Image.new("L", (5, 7), 100)  # smaller than the crop: upsampled
    crop = D.eval_pixels(tiny, D.DataConfig(img_size=72, policy="crop"))
    assert crop.shape == (1, 72, 72) and int(crop.float().mean()) == 100


def test_normalize_expands_grey_and_reduces_rgb() -> None:
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    y = D.normalize(x, D.DataConfig(in_chans=3))
    assert y.shape == (2, 3, 4, 4)
    expected = (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
    torch.testing.assert_close(y[0, :, 0, 0], expected)
    rgb = torch.zeros((1, 3, 4, 4), dtype=torch.uint8)
    assert D.normalize(rgb, D.DataConfig(in_chans=1)).shape == (1, 1, 4, 4)


# ---- augmentation and loaders ---------------------------------------------------------------------------
def test_augment_batch_translates_and_flips() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    flipped = D.augment_batch(x, D.DataConfig(img_size=6, pad=0, hflip=1.0), g)
    assert torch.equal(flipped, x.flip(3))
    out = D.augment_batch(x, D.DataConfig(img_size=6, pad=2, hflip=0.0), torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    # every output is a shifted copy of its input, zero where it came from the padding
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6]) for dy in range(5) for dx in range(5))
    again = D.augment_batch(x, D.DataConfig(img_size=6, pad=2, hflip=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_tensor_loader_shards_and_repeats_epochs() -> None:
    n = 50
    images, targets = torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.arange(n)
    cfg = D.DataConfig(img_size=8, pad=0, hflip=0.0)
    seen = []
    for rank in range(2):
        loader = D.TensorLoader(images, targets, 4, cfg, train=True, seed=3, rank=rank, world=2)
        loader.set_epoch(1)
        ys = torch.cat([y for _, y in loader])
        assert len(loader) == 6 and len(ys) == 24  # drop_last on whole global batches of 8
        seen.append(ys)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    loader = D.TensorLoader(images, targets, 4, cfg, train=True, seed=3)
    loader.set_epoch(1)
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    assert torch.equal(first, torch.cat([y for _, y in loader]))
    loader.set_epoch(2)
    assert not torch.equal(first, torch.cat([y for _, y in loader]))
    val = D.TensorLoader(images, targets, 16, cfg, train=False, rank=1, world=2)
    assert sum(len(y) for _, y in val) == 25  # evaluation keeps every sample exactly once


def test_stream_loader_skips_or_names_bad_images(tmp_path: Path, tiny_folder: Path) -> None:
    root = tmp_path / "d"
    shutil.copytree(tiny_folder, root)
    (root / "train" / "cross" / "broken.png").write_bytes(b"\x89PNG garbage")
    train, _ = D.find_splits(root)
    cfg = D.DataConfig(img_size=16, pad=0, hflip=0.0)
    ds = D.FolderDataset(train.samples, cfg, train=False)
    strict = D.StreamLoader(ds, 8, False, workers=0)
    with pytest.raises(D.DataError, match=r"broken\.png"):
        list(strict)
    lenient = D.StreamLoader(ds, 8, False, workers=0, skip_bad=True)
    assert sum(len(y) for _, y in lenient) == 24 and lenient.skipped == 1


def test_build_data_memory_and_stream_agree(tiny_folder: Path) -> None:
    cfg = D.DataConfig(img_size=20, pad=2, hflip=0.0)
    mem = D.build_data(str(tiny_folder), cfg, 4, 8, 0, 0, cache="memory")
    stream = D.build_data(str(tiny_folder), cfg, 4, 8, 0, 0, cache="none")
    assert isinstance(mem.train, D.TensorLoader) and isinstance(stream.train, D.StreamLoader)
    xm = torch.cat([x for x, _ in mem.val])
    xs = torch.cat([x for x, _ in stream.val])
    assert torch.equal(xm, xs)  # one evaluation transform, whichever way the images are held


def test_crop_policy_training_transform(tiny_folder: Path) -> None:
    cfg = D.DataConfig(img_size=72, policy="crop", scale=(0.5, 1.0))
    d = D.build_data(str(tiny_folder), cfg, 4, 8, 0, 0)
    x, y = next(iter(d.train))
    assert x.shape == (4, 1, 72, 72) and x.dtype == torch.uint8 and len(y) == 4
    xv, _ = next(iter(d.val))
    assert xv.shape[-2:] == (72, 72)


# ---- built-in datasets ----------------------------------------------------------------------------------
def test_fashion_mnist_from_debian_files(fake_fashion_mnist: Path, tmp_path: Path) -> None:
    cfg = D.DataConfig(img_size=32)
    d = D.build_data("fashion-mnist", cfg, 16, 32, 0, 0)
    assert d.class_names[0] == "T-shirt/top" and len(d.class_names) == 10
    x, _ = next(iter(d.val))
    assert x.shape == (32, 1, 32, 32)
    raw = tmp_path / "home" / "data" / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").is_file()  # unpacked once into the cache


def test_fashion_mnist_missing_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D.builtin, "FASHION_MNIST_DEBIAN", tmp_path / "nowhere")
    with pytest.raises(D.DataError, match="dataset-fashion-mnist"):
        D.prepare_fashion_mnist(tmp_path / "root")


def test_cifar_never_downloads_unasked(tmp_path: Path) -> None:
    with pytest.raises(D.DataError, match="--download"):
        D.load_builtin("cifar10", tmp_path, download=False)


# ---- hostile folders and images and EXIF orientation -----------------------------------------------------
def test_exif_rotated_jpeg_reads_as_its_upright_copy(tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF orientation 6 gives the pixels of the upright image."""
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how the camera wrote it; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.png", exif=exif)
    got, want = D.open_image(tmp_path / "phone.png"), D.open_image(tmp_path / "upright.png")
    assert got.size == want.size == (40, 24)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    stored.convert("RGB").save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(tmp_path / "plain.jpg", quality=95)
    jpeg, plain = D.open_image(tmp_path / "phone.jpg"), D.open_image(tmp_path / "plain.jpg")
    assert jpeg.size == (40, 24) and plain.size == (24, 40)
    # the same JPEG data, rotated on reading: exactly the stored pixels turned upright
    assert np.array_equal(np.asarray(jpeg), np.asarray(plain.transpose(Image.Transpose.ROTATE_270)))


def test_scan_folder_skips_links_loops_and_fifos_with_a_count(tmp_path: Path, capsys) -> None:
    import os

    cls = tmp_path / "root" / "a"
    cls.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (4, 4)).save(cls / f"{i}.png")
    (cls / "loop").symlink_to(cls)
    os.mkfifo(cls / "x.png")
    split = D.scan_folder(tmp_path / "root")
    assert len(split.samples) == 3
    assert (split.skipped.loops, split.skipped.non_regular) == (1, 1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 symlink loop" in err and "1 special file" in err


def test_decompression_bomb_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    from micronet_torch.data.config import DEFAULT_MAX_IMAGE_PIXELS

    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    with pytest.raises(D.DataError, match=r"big\.png.*60000 pixels.*--max-image-pixels"):
        D.open_image(path, max_pixels=1000)
    assert D.open_image(path, max_pixels=0).size == (300, 200)
    assert D.DataConfig().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    assert "max_image_pixels" not in D.DataConfig().to_dict()  # a reading limit, never recorded in a file
    with pytest.raises(D.DataError, match="img_size"):
        D.DataConfig.from_dict({"img_size": 10**9})
    assert D.DataConfig.from_dict({"img_size": 20, "max_image_pixels": 0}).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS


def test_decompression_bomb_in_a_folder_is_skippable(tmp_path: Path) -> None:
    """A bomb (past PIL's limit) in a class folder comes back as an unreadable sample, so --skip-bad-images skips it."""
    import struct
    import zlib

    side = 10_000  # 100 M pixels, past PIL's default limit; a few KB of file
    row = b"\0" * (1 + side // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    cls = tmp_path / "a"
    cls.mkdir()
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    (cls / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    Image.new("L", (8, 8)).save(cls / "ok.png")
    split = D.scan_folder(tmp_path)
    ds = D.FolderDataset(split.samples, D.DataConfig(img_size=8), train=False)
    results = {Path(split.samples[i][0]).name: ds[i] for i in range(len(ds))}
    assert results["ok.png"][0] is not None
    x, _, (path, err) = results["bomb.png"]  # the loader reports (file, message) for the main process to raise
    assert x is None and path.endswith("bomb.png") and "bomb.png" in err and "decompression bomb" in err


# ==== loaders: worker errors, skipped files named once =============================================================
def _broken_split(tmp_path: Path, tiny_folder: Path):
    root = tmp_path / "d14"
    shutil.copytree(tiny_folder, root)
    (root / "train" / "cross" / "broken.png").write_bytes(b"\x89PNG garbage")
    return D.find_splits(root)[0]


def test_worker_error_is_the_main_process_message(tmp_path: Path, tiny_folder: Path) -> None:
    train = _broken_split(tmp_path, tiny_folder)
    ds = D.FolderDataset(train.samples, D.DataConfig(img_size=16, pad=0, hflip=0.0), train=False)
    messages = []
    for workers in (0, 1):
        with pytest.raises(D.DataError) as err:
            list(D.StreamLoader(ds, 8, False, workers=workers))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "broken.png" in messages[1] and "DataLoader worker" not in messages[1]


def test_skipped_file_is_counted_once_over_epochs(tmp_path: Path, tiny_folder: Path) -> None:
    train = _broken_split(tmp_path, tiny_folder)
    ds = D.FolderDataset(train.samples, D.DataConfig(img_size=16, pad=0, hflip=0.0), train=True)
    loader = D.StreamLoader(ds, 4, True, workers=0, skip_bad=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        list(loader)
    assert loader.skipped == 1 and [Path(p).name for p in loader.skipped_files] == ["broken.png"]
