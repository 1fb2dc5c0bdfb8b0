"""What a run leaves for people to read: ``metrics.csv``, TensorBoard events, ``curves.png`` and ``summary.json``.

``RunLog`` owns the four (rank 0 writes them; on other ranks every method does nothing). The summary has one
duration, ``train_seconds``; ``read_summary`` still reads the ``train_time_s`` of summaries written before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .logs import write_curves, write_metrics_csv
from .run_folder import read_summary, write_summary_file
from .state import TrainState

__all__ = ["SUMMARY_KEYS", "RunLog", "open_tensorboard", "read_summary"]

# the keys of summary.json, in the order written
SUMMARY_KEYS = (
    "model", "status", "error", "pid", "host", "epochs", "epochs_completed", "best_top1", "best_epoch",
    "best_source", "final_top1", "final_top5", "final_loss", "final_ema_top1", "train_images_per_second",
    "train_seconds", "wall_time_s", "num_classes", "class_names", "data", "img_size", "batch_size", "world_size",
    "device", "output", "best_checkpoint", "last_checkpoint", "config",
)  # fmt: skip


def open_tensorboard(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``out/tensorboard``; a file in its place is a one-line ``OSError``."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is slow to import: only when training

    folder = out / "tensorboard"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "not a folder (the run writes its TensorBoard events there)", str(folder)
        )
    return SummaryWriter(log_dir=str(folder))


class RunLog:
    """The run folder's human-readable records; ``enabled`` is False on every rank but 0."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out, self.enabled = Path(out), enabled
        self.writer: Any = None
        self.started: float | None = None

    def open(self) -> None:
        """Open the TensorBoard events (``OSError`` when the folder cannot be made) and start the wall clock."""
        if self.enabled:
            self.writer = open_tensorboard(self.out)
        self.started = time.perf_counter()

    def close(self) -> None:
        """Close the TensorBoard events; a failed last flush is dropped (the run's error, if any, is told)."""
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
            self.writer = None

    def epoch(
        self,
        rows: list[dict[str, Any]],
        train: dict[str, float],
        val: dict[str, float],
        ema: dict[str, float] | None,
    ) -> None:
        """After an epoch: ``metrics.csv`` (every row), its scalars in TensorBoard, ``curves.png``."""
        if not self.enabled:
            return
        step = rows[-1]["epoch"]
        write_metrics_csv(rows, self.out / "metrics.csv")
        if self.writer is not None:
            w = self.writer
            w.add_scalar("train/loss", train["loss"], step)
            w.add_scalar("train/top1", train["top1"], step)
            w.add_scalar("train/images_per_second", train["images_per_second"], step)
            w.add_scalar("train/lr", rows[-1]["lr"], step)
            for k in ("loss", "top1", "top5"):
                w.add_scalar(f"val/{k}", val[k], step)
                if ema:
                    w.add_scalar(f"val_ema/{k}", ema[k], step)
            w.flush()
        write_curves(rows, self.out / "curves.png")

    def summary(
        self,
        status: str,
        cfg: TrainConfig,
        state: TrainState,
        class_names: list[str],
        world_size: int,
        device: str,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Write ``summary.json`` (keys ``SUMMARY_KEYS``) with ``status``: running, completed, interrupted,
        diverged or failed (then ``error`` says why); returns it (an empty dict on other ranks)."""
        if not self.enabled:
            return {}
        rows = state.metrics
        last = rows[-1] if rows else {}
        wall = time.perf_counter() - self.started if self.started is not None else 0.0
        summary = {
            "model": cfg.model,
            "status": status,
            "error": error,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "epochs": cfg.epochs,
            "epochs_completed": len(rows),
            "best_top1": state.best_top1 if rows else None,
            "best_epoch": state.best_epoch if rows else None,
            "best_source": state.best_source if rows else None,
            "final_top1": last.get("val_top1"),
            "final_top5": last.get("val_top5"),
            "final_loss": last.get("val_loss"),
            "final_ema_top1": last.get("ema_top1"),
            "train_images_per_second": state.train_images / state.train_time if state.train_time else None,
            "train_seconds": state.train_time,
            "wall_time_s": wall,
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "data": cfg.data,
            "img_size": cfg.img_size,
            "batch_size": cfg.batch_size,
            "world_size": world_size,
            "device": device,
            "output": str(self.out),
            "best_checkpoint": str(self.out / "best.pt"),
            "last_checkpoint": str(self.out / "last.pt"),
            "config": cfg.to_dict(),
        }
        write_summary_file(self.out, summary)
        return summary
