"""The run folder: created, proven writable, held by one process at a time, cleaned only by its holder.

A run holds its folder with a lock file (``.lock``) created atomically (``O_CREAT | O_EXCL``) that records the
holder's pid, host and start time. A second run on the folder stops at once naming the holder; a lock whose
process is gone (on this host) is stale and taken over. The same mechanism claims one (run, seed) pair of
``micronet experiment run`` (``claim``). ``run_status`` tells a live run from a dead one for readers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from .._fs import atomic_write, probe_writable
from .checkpoint import remove_stale_temporaries
from .config import TrainingError

LOCK_NAME = ".lock"


class FolderBusy(TrainingError):
    """Another live process holds the folder (or the claim); the message names it."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict[str, Any]) -> bool | None:
    """True/False when the holder can be checked (same host), None when it runs on another host."""
    if info.get("host") != socket.gethostname():
        return None
    pid = int(info.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = info.get("proc_start")
    return not (start and _proc_start(pid) not in (None, start))


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None when there is none (an unreadable one counts as empty)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}"


def refuse_non_file(path: Path) -> None:
    """Refuse a lock name taken by a folder, a link or a device: it can be neither read, replaced nor taken over."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = "link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else "special file"
    raise TrainingError(
        f"{path} is a {kind}, not a lock file: remove it (a run records there that it holds the folder), then retry"
    )


class Lock:
    """An exclusive lock file: ``acquire`` creates it or raises ``FolderBusy``; ``release`` removes it if ours."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self.held = False
        self.took_over: dict[str, Any] | None = None  # the dead holder whose stale lock was replaced

    def acquire(self, wait_partial: float = 2.0) -> Lock:
        """Take the lock: create the file exclusively; a stale holder's file is removed and creation retried."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        me["proc_start"] = _proc_start(os.getpid())
        deadline = time.monotonic() + wait_partial
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                refuse_non_file(self.path)
                info = read_lock(self.path)
                if info is None:
                    continue  # released meanwhile
                if not info and time.monotonic() < deadline:
                    time.sleep(0.05)  # being written by its creator
                    continue
                alive = _alive(info) if info else False
                if alive is False:
                    self._remove_stale(info)  # its process is gone
                    self.took_over = info
                    continue
                where = "" if alive else " (on another host: cannot check it; delete the lock if that run is dead)"
                raise FolderBusy(
                    f"{self.what} is in use by another run ({describe_holder(info)}){where}; "
                    f"wait for it to finish, or choose another folder (lock: {self.path})"
                ) from None
            except OSError as err:
                raise TrainingError(f"cannot create the lock {self.path} ({err.strerror or err})") from err
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return self

    def _remove_stale(self, info: dict[str, Any]) -> None:
        """Delete the stale lock ``info`` under a take-over guard, so that two processes finding the same stale
        lock never delete the fresh one the other has just created."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > 10:  # its taker died mid-way
                    guard.unlink()
            time.sleep(0.05)
            return
        try:
            if read_lock(self.path) == info:  # still the stale file: a fresh one cannot appear while it exists
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file, only if this process still holds it."""
        if not self.held:
            return
        self.held = False
        info = read_lock(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(path: Path, what: str) -> Lock | None:
    """Try to claim ``path`` (a claim file); None when a live process holds it."""
    try:
        return Lock(path, what).acquire()
    except FolderBusy:
        return None


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> Lock:
    """Create the output folder, prove it writable, take its lock; refuse to mix a new run into an old one.

    Returns the held lock (release it when the run ends). Only the holder removes stale temporaries, so a
    second process can never delete the files a running one is about to rename.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)  # a random name, O_EXCL | O_NOFOLLOW: a planted link is never written through
    except OSError as err:
        raise TrainingError(
            f"--output {out} is not writable ({err.strerror or err}); choose a folder you can write to"
        ) from err
    lock = Lock(out / LOCK_NAME, f"--output {out}").acquire()
    try:
        if not resume and not overwrite and (out / "last.pt").exists():
            raise TrainingError(
                f"--output {out} already holds a run (last.pt); pass --resume to continue it, --overwrite to "
                "start over there, or choose another --output"
            )
        remove_stale_temporaries(out)  # a killed atomic write's leftovers; the run writes its files again
    except BaseException:
        lock.release()
        raise
    return lock


def write_summary_file(out: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically (``_fs.atomic_write``)."""
    payload = (json.dumps(summary, indent=2) + "\n").encode()
    atomic_write(out / "summary.json", lambda fh: fh.write(payload))


def read_summary(path: str | os.PathLike) -> Any:
    """A ``summary.json`` as written (``ValueError`` when it is not JSON); in an object, ``train_seconds`` is
    filled from the ``train_time_s`` of summaries written before that key."""
    summary = json.loads(Path(path).read_text())
    if isinstance(summary, dict) and "train_seconds" not in summary and "train_time_s" in summary:
        summary["train_seconds"] = summary["train_time_s"]
    return summary


def run_status(out: str | os.PathLike) -> dict[str, Any]:
    """What a reader can tell about a run folder: its summary, corrected by the lock.

    ``status`` is the summary's, except that a run marked ``running`` whose holder is gone (``kill -9``, a
    crash, power loss) reads ``interrupted``; ``live`` says whether a process holds the folder now and
    ``hint`` how to continue.
    """
    out = Path(out)
    summary_path = out / "summary.json"
    if not out.is_dir():
        why = "a file: give the folder that holds it" if out.exists() else "it does not exist"
        raise FileNotFoundError(f"{out} is not a run folder ({why})")
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = read_summary(summary_path)
        except ValueError as err:
            raise TrainingError(f"{summary_path} is not valid JSON ({err})") from err
        if not isinstance(summary, dict):
            raise TrainingError(
                f"{summary_path} holds a JSON {type(summary).__name__}, not a run summary (an object with its "
                "status); it was not written by micronet train: remove it, or give the folder of a run"
            )
    elif not (out / "last.pt").exists() and not (out / LOCK_NAME).exists():
        raise FileNotFoundError(f"{out} holds no run (no summary.json, last.pt or lock)")
    info = read_lock(out / LOCK_NAME)
    live = bool(info) and _alive(info) is not False
    status = summary.get("status", "running" if live else "interrupted")
    if status == "running" and not live:
        status = "interrupted"
    if live and status != "running":
        status = "running"
    hint = ""
    if status in ("interrupted", "failed", "diverged"):
        hint = f"continue with: micronet train --output {out} --resume"
    elif status == "running":
        hint = f"held by {describe_holder(info or {})}"
    return {
        **summary,
        "status": status,
        "recorded_status": summary.get("status"),
        "live": live,
        "holder": info or None,
        "hint": hint,
    }
