"""Finding data: class-folder trees (``root/<class>/<image>``) and the ImageNet ``train/`` + ``val/`` layout."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataError
from .images import IMG_EXTENSIONS
from .scan import SkipCounts, walk_images


@dataclass
class ImageFolderSplit:
    """One class-folder tree: sorted class names, (path, label) samples and what the scan left out."""

    root: Path
    class_names: list[str]
    samples: list[tuple[str, int]] = field(repr=False)
    skipped: SkipCounts = field(default_factory=SkipCounts)


def scan_folder(root: str | os.PathLike, what: str = "data folder", quiet: bool = False) -> ImageFolderSplit:
    """Class subfolders of ``root`` and their images (any depth), with clear errors when empty.

    Directory links are followed, but each real folder is entered once (a symlink loop cannot multiply the
    samples), and only regular files are taken (a FIFO named ``x.png`` would block the scan forever); what
    was left out is counted in ``skipped`` and, unless ``quiet``, said in one line on stderr.
    """
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
    skipped = SkipCounts()
    for label, name in enumerate(classes):
        found, counts = walk_images(root / name, IMG_EXTENSIONS)
        skipped.add(counts)
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
    if skipped.total() and not quiet:
        print(f"warning: {what} {root}: {skipped.summary()}", file=sys.stderr)
    return ImageFolderSplit(root, classes, samples, skipped)


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
