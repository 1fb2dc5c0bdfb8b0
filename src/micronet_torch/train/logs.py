"""What a run shows and leaves behind per epoch: progress bars or log lines, ``metrics.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any

from .._fs import atomic_write

CSV_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_loss",
    "ema_top1",
    "ema_top5",
)


class Progress:
    """tqdm bars on a terminal, plain periodic lines otherwise (CI, log files); rank 0 only."""

    def __init__(self, enabled: bool, log_interval: int) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.log_interval = log_interval
        self.bar: Any = None
        self.last = 0.0

    def start(self, total: int, desc: str, initial: int = 0) -> None:
        self.total, self.desc, self.last = total, desc, time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, step: int, **info: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
            return
        now = time.monotonic()
        due = step % self.log_interval == 0 if self.log_interval > 0 else now - self.last >= 30.0
        if due:
            self.last = now
            extras = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            self.line(f"{self.desc} step {step}/{self.total}  {extras}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


def write_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """``curves.png``: loss and top-1 per epoch, training and validation (and EMA when present)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    ax1.plot(ep, [r["val_loss"] for r in rows], "o-", label="val")
    ax2.plot(ep, [r["train_top1"] for r in rows], "o-", label="train")
    ax2.plot(ep, [r["val_top1"] for r in rows], "o-", label="val")
    if any(r.get("ema_top1") not in (None, "") for r in rows):
        ax1.plot(ep, [r["ema_loss"] for r in rows], "o--", label="val (EMA)")
        ax2.plot(ep, [r["ema_top1"] for r in rows], "o--", label="val (EMA)")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="top-1 accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    _write_atomic(path, buf.getvalue())


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def write_metrics_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k)) for k in CSV_FIELDS})
    _write_atomic(path, buf.getvalue().encode())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)
