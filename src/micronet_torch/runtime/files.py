"""An export's files as one transaction: checked before any work, written to a staging folder, renamed into place.

Every file of an export (the model, its weights, its sidecar metadata) is written into a hidden staging folder
beside the output and renamed into place only when all of them are complete and their metadata is in, the main
file last; an interrupted export (Ctrl-C, ``kill -9``, a full disk) leaves the previous files as they were. An
export replaces only files that an export of the same format wrote (``--overwrite`` replaces any), and a write
error ends as one ``ExportError`` line naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .result import ExportError

STAGING_PREFIX = ".micronet-export-"  # + pid: a staging folder whose process is gone is removed by the next export
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# how converters that wrap the OSError (torch's zip writer, protobuf) word a failed write
_WRAPPED = ("file write failed", "unexpected pos", *(os.strerror(e) for e in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)))


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def owned(target: Any, main: Path) -> bool:
    """True when ``main`` is a file that ``micronet export --format <target>`` wrote (its metadata says so)."""
    if not main.is_file():
        return False
    try:
        meta = target.read_metadata(main)
    except Exception:
        return False
    return "micronet_torch_version" in meta and meta.get("export_format", target.name) == target.name


def check_outputs(target: Any, mains: list[Path], overwrite: bool = False) -> list[Path]:
    """Every file the export of ``mains`` will write, after checking, before any work, that each can be: a name
    the file system takes, a parent that is (or can be) a folder, and no file that another format's export, or
    anything but an export, wrote there (unless ``overwrite``). Raises ``ExportError`` naming the file."""
    paths: list[Path] = []
    for main in mains:
        paths += target.files(main)
        folder = main.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise ExportError(f"--output {main}: {folder} is a file, not a folder; give a path in a folder")
    for path in paths:
        limit = _name_max(path.parent)
        if len(os.fsencode(path.name)) > limit:
            raise ExportError(
                f"--output: the file name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes, more than the "
                f"{limit} this file system allows; give a shorter name"
            )
        if path.is_dir():
            raise ExportError(f"--output: {path} is a folder; give the file to write")
    if not overwrite:
        for main in mains:
            for path in target.files(main):
                if os.path.lexists(path) and not owned(target, target.main_file(main)):
                    raise ExportError(
                        f"{path} exists and was not written by micronet export --format {target.name}: remove it, "
                        "give another --output, or pass --overwrite to replace it"
                    )
    return paths


def _remove_stale(folder: Path) -> None:
    """Staging folders of exports whose process is gone (killed mid-way), ours only."""
    for stage in folder.glob(STAGING_PREFIX + "*"):
        try:
            pid = int(stage.name[len(STAGING_PREFIX) :].split("-")[0])
            if stage.is_symlink() or not stage.is_dir() or stage.stat().st_uid != os.getuid():
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stage, ignore_errors=True)
        except (ValueError, OSError):
            continue


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A fresh hidden folder inside ``folder`` (created if needed) for an export's files; removed afterwards, with
    whatever was not committed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
    except OSError as err:
        raise ExportError(f"cannot create files in {folder} ({err.strerror or err})") from err
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit(moves: list[tuple[Path, Path]]) -> None:
    """Make each staged file durable, then rename it to its final path in the order given (the main file last)."""
    try:
        for src, _ in moves:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for src, dst in moves:
            os.replace(src, dst)
    except OSError as err:
        raise ExportError(f"cannot write {moves[-1][1]} ({err.strerror or err})") from err
    with contextlib.suppress(OSError):
        fd = os.open(moves[-1][1].parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_failure(err: BaseException) -> str | None:
    """Why ``err`` is a failed write (full disk, file size limit, no permission), from the ``OSError`` it is or wraps
    (converters wrap it in their own errors, or only quote its words); None when it is something else."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _WRITE_ERRNOS:
            return cur.strerror or str(cur)
        cur = cur.__cause__ or cur.__context__
    text = str(err)
    return next((words for words in _WRAPPED if words in text), None)
