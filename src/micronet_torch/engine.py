"""The training loop: one process or DDP under torchrun, AMP, EMA, exact resume, metrics and logs.

``train(cfg)`` runs a resolved ``TrainConfig`` and leaves in ``cfg.output``: ``last.pt`` / ``best.pt``
(atomic, every epoch), ``metrics.csv``, ``summary.json``, TensorBoard events and ``curves.png``.
Optimiser, schedule and EMA come from timm; datasets and transforms from torchvision (``data.py``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .data import DataConfig, build_data, default_policy, normalize

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


class TrainingError(ValueError):
    """A training run stopped for a reason the user can act on (the message says what to do)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the state was saved. ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


# ---- configuration ----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every training setting. ``None`` means 'the recipe's value' (``resolve`` fills it in)."""

    model: str = "micronet_m0"
    data: str = "fashion-mnist"
    output: str = "runs/micronet_m0"
    recipe: str = "default"  # 'default' (small data, short runs) or 'paper' (the published ImageNet recipe)
    epochs: int | None = None
    batch_size: int | None = None  # global: per process = batch_size / world size
    eval_batch_size: int = 256  # per process
    lr: float | None = None  # at the given global batch size
    min_lr: float | None = None
    warmup_epochs: float | None = None
    warmup_lr: float | None = None
    opt: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    wd_all: bool | None = None  # weight decay on biases and norms too (the published recipe)
    label_smoothing: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    reprob: float = 0.0  # random erasing probability (timm RandomErasing, per image, on the device)
    clip_grad: float | None = None
    drop_rate: float | None = None
    img_size: int | None = None
    in_chans: int = 3
    hflip: float | None = None
    pad: int | None = None
    scale: tuple[float, float] | None = None
    crop_pct: float = 0.875
    amp: bool = False
    ema: bool = False
    ema_decay: float | None = None
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    workers: int | None = None
    seed: int = 0
    device: str = "auto"
    pretrained: str | None = None
    data_root: str | None = None
    download: bool = False
    skip_bad_images: bool = False
    cache: str = "auto"
    log_interval: int = 0  # steps between plain log lines; 0: every 30 s
    threads: int | None = None
    quiet: bool = False
    model_kwargs: dict[str, Any] | None = None  # extra create_model arguments (ablation Variant fields)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["scale"] is not None:
            d["scale"] = list(d["scale"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in d.items() if k in known}
        if out.get("scale") is not None:
            out["scale"] = tuple(out["scale"])
        return cls(**out)


# fields a resumed run may change without a warning (they do not change the numbers)
RUNTIME_FIELDS = {"workers", "device", "log_interval", "threads", "quiet", "output", "data", "data_root", "download"}


def paper_weight_decay(model: str) -> float:
    return 4e-5 if "m3" in model else 3e-5


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` with the recipe's value. The paper recipe follows ``paper_facts.md``; the
    default recipe is tuned for small data and short runs on small images."""
    from .registry import resolve_name

    c = TrainConfig.from_dict(cfg.to_dict())
    try:
        spec, _ = resolve_name(cfg.model)
        c.model, dropout = spec.name, spec.dropout
    except ValueError:
        build_model(cfg.model, num_classes=2)  # a baseline / timm model, or the 'unknown model' error
        dropout = None
    name = c.model
    if c.recipe == "paper":
        m3 = name.endswith("m3")
        c.epochs = 600 if c.epochs is None else c.epochs
        c.batch_size = (512 if m3 else 256) if c.batch_size is None else c.batch_size
        c.lr = 0.1 * c.batch_size / 256 if c.lr is None else c.lr
        c.opt = c.opt or "momentum"
        c.weight_decay = paper_weight_decay(name) if c.weight_decay is None else c.weight_decay
        c.wd_all = True if c.wd_all is None else c.wd_all
        c.warmup_epochs = (5.0 if m3 else 0.0) if c.warmup_epochs is None else c.warmup_epochs
        c.label_smoothing = 0.0 if c.label_smoothing is None else c.label_smoothing
        c.img_size = 224 if c.img_size is None else c.img_size
        c.scale = c.scale or (0.08, 1.0)
        c.ema_decay = 0.9998 if c.ema_decay is None else c.ema_decay
    elif c.recipe == "default":
        c.epochs = 15 if c.epochs is None else c.epochs
        c.batch_size = 128 if c.batch_size is None else c.batch_size
        c.opt = c.opt or "adamw"
        adaptive = c.opt in ("adamw", "adam", "nadamw", "lamb", "lion", "adan")
        # measured on 4,000 28-px digits and Fashion-MNIST: AdamW 4e-3 at batch 64, square-root scaling
        c.lr = (4e-3 if adaptive else 0.1) * math.sqrt(c.batch_size / 64) if c.lr is None else c.lr
        c.weight_decay = (0.05 if adaptive else 5e-5) if c.weight_decay is None else c.weight_decay
        c.wd_all = False if c.wd_all is None else c.wd_all
        c.warmup_epochs = min(2.0, 0.1 * c.epochs) if c.warmup_epochs is None else c.warmup_epochs
        c.label_smoothing = 0.0 if c.label_smoothing is None else c.label_smoothing  # it cost 1-2 points
        c.img_size = 32 if c.img_size is None else c.img_size
        c.scale = c.scale or (0.25, 1.0)
        c.ema_decay = 0.998 if c.ema_decay is None else c.ema_decay
        c.pad = c.img_size // 16 if c.pad is None or c.pad < 0 else c.pad  # 2 px at 32: 4 px cost 1 point
    else:
        raise TrainingError(f"--recipe {c.recipe!r} is unknown; use 'default' or 'paper'")
    c.min_lr = 0.0 if c.min_lr is None else c.min_lr
    c.warmup_lr = c.lr * 0.01 if c.warmup_lr is None else c.warmup_lr
    if c.hflip is None:
        # flips change the class of digits, letters, arrows: off for small-image folders, whose content
        # is unknown; on for the built-in datasets (clothes, objects) and ImageNet-style data
        folder = c.data.lower().replace("_", "-") not in ("fashion-mnist", "fashionmnist", "cifar10", "cifar100")
        c.hflip = 0.0 if folder and default_policy(c.img_size) == "small" else 0.5
    if c.pad is None or c.pad < 0:
        c.pad = c.img_size // 8
    c.drop_rate = dropout if c.drop_rate is None else c.drop_rate
    c.opt = c.opt.lower()
    return c


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """A MicroNet by name, or (when ``baselines.py`` is present) a baseline / any timm model."""
    try:
        from .baselines import build_model as build
    except ImportError:
        from .registry import create_model as build
    return build(name, **kwargs)


def data_config(cfg: TrainConfig) -> DataConfig:
    """The image pipeline of a resolved config (also the one recorded in its checkpoints)."""
    return DataConfig(
        img_size=cfg.img_size,
        in_chans=cfg.in_chans,
        policy=default_policy(cfg.img_size),
        crop_pct=cfg.crop_pct,
        hflip=cfg.hflip,
        pad=cfg.pad,
        scale=tuple(cfg.scale),
    )


def validate(cfg: TrainConfig, world: int) -> None:
    """Reject settings that cannot work, with the flag to change."""
    if cfg.batch_size < 2:
        raise TrainingError(
            f"--batch-size {cfg.batch_size}: MicroNet's head ends in BatchNorm1d, which cannot train on a "
            "single image per batch; use --batch-size 2 or more (16+ trains well)"
        )
    if cfg.batch_size % world:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} is the global batch; it must divide by the {world} processes"
        )
    if cfg.batch_size // world < 2:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} over {world} processes leaves {cfg.batch_size // world} image per "
            "process; BatchNorm1d in the head needs at least 2: raise --batch-size"
        )
    if cfg.epochs < 1:
        raise TrainingError(f"--epochs {cfg.epochs}: train for at least one epoch")
    if cfg.img_size < 16:
        raise TrainingError(f"--img-size {cfg.img_size}: MicroNet downsamples 32x; use 16 or more (32 for 28-px data)")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise TrainingError(f"--lr {cfg.lr}: the learning rate must be a positive number")
    if cfg.in_chans not in (1, 3):
        raise TrainingError(f"--in-chans {cfg.in_chans}: images feed 1 (greyscale) or 3 (RGB) channels")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and (cfg.batch_size // world) % 2:
        raise TrainingError("--mixup/--cutmix need an even batch size per process")
    if not 0.0 <= cfg.reprob <= 1.0:
        raise TrainingError(f"--reprob {cfg.reprob}: random erasing is a probability; use a value in [0, 1]")


# ---- processes and devices ---------------------------------------------------------------------------
@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; 'cuda' under torchrun means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise TrainingError(f"--device {name!r} is not a device torch knows ({err})") from err


def setup_distributed(device: str) -> DistEnv:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, local_world, dev)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads(img_size: int, processes: int = 1) -> int:
    """CPU threads per process. MicroNet's ops on small images are too small to split: on 2 cores a
    second thread gains ~1.4x when the machine is idle but loses 10-80x when another process takes a
    core (OpenMP threads spin at every op), so small images use 1 thread there, at most 4 elsewhere."""
    cores = max(1, available_cores() // processes)
    if default_policy(img_size) == "small":
        return 1 if cores <= 2 else min(4, cores)
    return cores


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global RNGs (dropout, mixup) at the start of an epoch: resuming needs nothing else."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**63


# ---- metrics ----------------------------------------------------------------------------------------
class Meter:
    """Summed loss and correct counts; reduced over processes by ``reduce``."""

    def __init__(self, device: torch.device) -> None:
        self.t = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        self.t += torch.stack(
            [
                loss.detach().double() * n,
                hit[:, 0].sum().double(),
                hit.any(1).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=target.device),
            ]
        )

    def reduce(self, distributed: bool) -> dict[str, float]:
        t = self.t.clone()
        if distributed:
            dist.all_reduce(t)
        loss, c1, c5, n = t.tolist()
        n = max(n, 1.0)
        return dict(loss=loss / n, top1=100.0 * c1 / n, top5=100.0 * c5 / n, n=int(t[3].item()))

    def state(self) -> list[float]:
        return self.t.tolist()

    def load(self, values: list[float]) -> None:
        self.t = torch.tensor(values, dtype=torch.float64, device=self.t.device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    dcfg: DataConfig,
    device: torch.device,
    channels_last: bool = False,
    distributed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1, top-5, cross-entropy and count of ``model`` over ``loader`` (summed over processes), in
    float32 so that ``micronet eval`` of a saved checkpoint gives the very same numbers."""
    was_training = model.training
    model.eval()
    meter = Meter(device)
    for x, y in loader:
        x = normalize(x.to(device, non_blocking=True), dcfg, channels_last)
        y = y.to(device, non_blocking=True)
        logits = model(x).float()
        meter.add(F.cross_entropy(logits, y), logits, y)
        if progress:
            progress(len(y))
    model.train(was_training)
    return meter.reduce(distributed)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's BatchNorm statistics to every process (each updates its own during training)."""
    for buf in module.buffers():
        dist.broadcast(buf, 0)


# ---- logging ----------------------------------------------------------------------------------------
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
    ckpt.atomic_write(path, lambda fh: fh.write(data))


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


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create the output folder and prove it writable; refuse to mix a new run into an old one."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(
            f"--output {out} is not writable ({err.strerror or err}); choose a folder you can write to"
        ) from err
    if not resume and not overwrite and (out / "last.pt").exists():
        raise TrainingError(
            f"--output {out} already holds a run (last.pt); pass --resume to continue it, --overwrite to "
            "start over there, or choose another --output"
        )
    ckpt.remove_stale_temporaries(out)  # a killed atomic write's leftovers; the run writes its files again


# ---- the run ----------------------------------------------------------------------------------------
def build_loss(cfg: TrainConfig) -> nn.Module:
    """Training loss: soft-target CE under mixup/cutmix, else CE with label smoothing."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class StopFlag:
    """SIGINT/SIGTERM handlers that ask the loop to stop after the current step."""

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()


class Trainer:
    """One training run; ``run()`` returns the summary dict written to ``summary.json``."""

    def __init__(self, cfg: TrainConfig, resume: str | None = None, overwrite: bool = False) -> None:
        self.requested, self.resume_from, self.overwrite = cfg, resume, overwrite

    # -- set-up
    def _setup(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        self.env = env = setup_distributed(self.requested.device)
        self.out = Path(self.requested.output)
        resume_path = None
        self.state: dict[str, Any] | None = None
        if self.resume_from:
            resume_path = self.out / "last.pt" if self.resume_from == "auto" else Path(self.resume_from)
            if not resume_path.is_file():
                if self.resume_from == "auto" and getattr(self, "resume_if_present", False):
                    resume_path = None
                else:
                    raise TrainingError(
                        f"--resume: no checkpoint at {resume_path}; start without --resume (or point "
                        "--output at the run to continue)"
                    )
        if resume_path is not None:
            self.state = ckpt.load(resume_path)
            if not ckpt.is_training_checkpoint(self.state) or "config" not in self.state:
                raise TrainingError(f"--resume {resume_path}: not a micronet training checkpoint (last.pt)")
            self.cfg = self._merge_resumed(self.state["config"])
        else:
            self.cfg = resolve(self.requested)
        cfg = self.cfg
        validate(cfg, env.world)
        if env.is_main:
            check_output_dir(self.out, resume=self.state is not None, overwrite=self.overwrite)
        if env.distributed:
            dist.barrier()
        torch.set_num_threads(cfg.threads or default_threads(cfg.img_size, env.local_world))
        seed_everything(cfg.seed + env.rank)
        self.log = Progress(env.is_main and not cfg.quiet, cfg.log_interval)
        self.dcfg = data_config(cfg)
        workers = cfg.workers if cfg.workers is not None else _default_workers(env)
        self.data = build_data(
            cfg.data,
            self.dcfg,
            cfg.batch_size // env.world,
            cfg.eval_batch_size,
            workers,
            cfg.seed,
            env.rank,
            env.world,
            data_root=cfg.data_root,
            download=cfg.download and env.is_main,
            skip_bad=cfg.skip_bad_images,
            cache=cfg.cache,
            device=env.device,
        )
        self.class_names = self.data.class_names
        if self.state is not None and list(self.state["class_names"]) != self.class_names:
            raise TrainingError(
                f"--resume: the checkpoint was trained on classes {self.state['class_names'][:5]}..., the data "
                f"now has {self.class_names[:5]}...; resume with the same --data"
            )
        n_cls = len(self.class_names)
        pretrained = cfg.pretrained if self.state is None else None
        extra = dict(cfg.model_kwargs or {})
        if cfg.drop_rate is not None:
            extra["drop_rate"] = cfg.drop_rate
        model = build_model(cfg.model, pretrained=pretrained, num_classes=n_cls, in_chans=cfg.in_chans, **extra)
        if self.state is not None:
            model.load_state_dict(self.state["model"])
        if cfg.sync_bn and env.distributed:
            if env.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif env.is_main:
                print("note: --sync-bn needs CUDA (PyTorch's SyncBatchNorm); each CPU process keeps its own BatchNorm")
        model.to(env.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model  # the bare module: state dicts, evaluation, EMA
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
            if self.state is not None and self.state.get("ema") is not None:
                self.ema.module.load_state_dict(self.state["ema"])
        self.optimizer = create_optimizer_v2(
            model,
            opt=cfg.opt,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            filter_bias_and_bn=not cfg.wd_all,
        )
        self.steps_per_epoch = len(self.data.train)
        total = cfg.epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(
            self.optimizer,
            t_initial=total,
            lr_min=cfg.min_lr,
            warmup_t=round(cfg.warmup_epochs * self.steps_per_epoch),
            warmup_lr_init=cfg.warmup_lr,
            warmup_prefix=False,
            t_in_epochs=False,
        )
        use_fp16 = cfg.amp and env.device.type == "cuda"
        self.amp_dtype = torch.float16 if use_fp16 else torch.bfloat16
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=use_fp16)
        self.forward_model: nn.Module = model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [env.device.index] if env.device.type == "cuda" else None
            self.forward_model = DDP(model, device_ids=ids)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.loss_fn = build_loss(cfg)
        self.erasing = None
        if cfg.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            # after normalization, so erased pixels are N(0, 1) noise like the rest of the batch's statistics
            self.erasing = RandomErasing(probability=cfg.reprob, mode="pixel", device=str(env.device))
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=n_cls
            )
        # progress state
        self.rows: list[dict[str, Any]] = []
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch, self.best_source = -1.0, 0, "model"
        self.train_time, self.train_images = 0.0, 0
        self.partial: list[float] | None = None
        if self.state is not None:
            s = self.state
            self.optimizer.load_state_dict(s["optimizer"])
            self.scheduler.load_state_dict(s["scheduler"])
            if s.get("scaler"):
                self.scaler.load_state_dict(s["scaler"])
            self.rows = list(s.get("metrics", []))
            self.start_epoch, self.start_step = int(s["epoch"]), int(s.get("step_in_epoch", 0))
            self.global_step = int(s.get("global_step", self.start_epoch * self.steps_per_epoch))
            self.best_top1, self.best_epoch = float(s.get("best_top1", -1.0)), int(s.get("best_epoch", 0))
            self.best_source = str(s.get("best_source", "model"))
            self.train_time, self.train_images = float(s.get("train_time", 0.0)), int(s.get("train_images", 0))
            self.partial = s.get("partial")
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def _merge_resumed(self, saved: dict[str, Any]) -> TrainConfig:
        """The saved (resolved) config, with the flags given now on top; changed settings are reported."""
        base = TrainConfig.from_dict(saved)
        given = self.requested
        default = TrainConfig()
        changed = []
        for f in fields(TrainConfig):
            new = getattr(given, f.name)
            if new is None or new == getattr(default, f.name) or new == getattr(base, f.name):
                continue
            if f.name == "model":
                from .registry import resolve_name

                try:
                    new_name = resolve_name(new)[0].name
                except ValueError:
                    new_name = new
                if new_name != base.model:
                    raise TrainingError(
                        f"--resume: {self.out}/last.pt is a {base.model} run, not {new}; resume it with "
                        f"--model {base.model} or train {new} in another --output"
                    )
                continue
            setattr(base, f.name, new)
            if f.name not in RUNTIME_FIELDS:
                changed.append(f.name)
        if changed and int(os.environ.get("RANK", "0")) == 0:
            print(f"resuming with changed settings: {', '.join(changed)} (the run will differ from the original)")
        base.output = str(self.out)
        return base

    # -- checkpoints
    def _checkpoint(self, epoch: int, step_in_epoch: int, model_sd: dict, source: str) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "format": "micronet-torch-train",
            "version": 1,
            "model": model_sd,
            "model_name": cfg.model,
            "model_kwargs": dict(cfg.model_kwargs or {}),
            "model_source": source,
            "num_classes": len(self.class_names),
            "in_chans": cfg.in_chans,
            "img_size": cfg.img_size,
            "class_names": list(self.class_names),
            "data_config": self.dcfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": ckpt.clean_state_dict(self.ema.module.state_dict()) if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "config": cfg.to_dict(),
            "metrics": list(self.rows),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_source": self.best_source,
            "train_time": self.train_time,
            "train_images": self.train_images,
            "world_size": self.env.world,
            "rng": ckpt.rng_state(),
            "loader_rng": self.data.train.generator.get_state() if hasattr(self.data.train, "generator") else None,
            "partial": self.partial,
            "torch_version": str(torch.__version__),
        }

    def _save_last(self, epoch: int, step_in_epoch: int) -> None:
        sd = ckpt.clean_state_dict(self.model.state_dict())
        ckpt.save_atomic(self._checkpoint(epoch, step_in_epoch, sd, "model"), self.out / "last.pt")

    # -- one epoch
    def _train_epoch(self, epoch: int, start_step: int, stop: StopFlag) -> tuple[dict[str, float], bool]:
        cfg, env = self.cfg, self.env
        loader = self.data.train
        seed = epoch_seed(cfg.seed, epoch, env.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        loader.set_epoch(epoch)
        meter = Meter(env.device)
        if start_step:  # resuming mid-epoch: the RNGs and meters as they were at the interruption
            s = self.state or {}
            if s.get("world_size", 1) == env.world and "rng" in s:
                ckpt.set_rng_state(s["rng"])
                if s.get("loader_rng") is not None:
                    loader.generator.set_state(s["loader_rng"])
            if self.partial:
                meter.load(self.partial)
        self.forward_model.train()
        n_steps = self.steps_per_epoch
        self.log.start(n_steps, f"epoch {epoch + 1}/{cfg.epochs}", initial=start_step)
        t0, images = time.perf_counter(), 0
        autocast = torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=cfg.amp)
        step = start_step
        stopped = False
        for x, y in loader.iterate(start_step):
            x = normalize(x.to(env.device, non_blocking=True), self.dcfg, cfg.channels_last)
            y = y.to(env.device, non_blocking=True)
            target = y
            if self.erasing is not None:
                x = self.erasing(x)
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            with autocast:
                logits = self.forward_model(x)
                loss = self.loss_fn(logits.float(), target)
            if not torch.isfinite(loss).item():
                lr = self.optimizer.param_groups[0]["lr"]
                self._diverged(epoch, step, lr, float(loss.item()))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            self.scheduler.step_update(self.global_step)
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            meter.add(loss.detach(), logits.detach().float(), y)
            step += 1
            images += y.shape[0]
            self.log.update(step, loss=float(loss.item()), lr=self.optimizer.param_groups[0]["lr"])
            if self._should_stop(stop):
                stopped = True
                break
        self.log.close()
        elapsed = time.perf_counter() - t0
        world_images = images * env.world
        self.train_time += elapsed
        self.train_images += world_images
        if stopped:
            self.partial = meter.state()
            return {}, True
        self.partial = None
        result = meter.reduce(env.distributed)
        result["images_per_second"] = world_images / max(elapsed, 1e-9)
        return result, False

    def _should_stop(self, stop: StopFlag) -> bool:
        if not self.env.distributed:
            return bool(stop.signum)
        flag = torch.tensor([float(stop.signum)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop.signum:
            stop.signum = int(flag.item())
        return bool(flag.item())

    def _diverged(self, epoch: int, step: int, lr: float, loss: float) -> None:
        last = self.out / "last.pt"
        keep = (
            f"the last good checkpoint is {last} (after epoch {self.start_epoch_done})"
            if last.exists()
            else "no epoch had finished, so no checkpoint was written"
        )
        if self.env.is_main:
            self._write_summary(status="diverged")
        raise TrainingError(
            f"the training loss became {loss} at epoch {epoch + 1}, step {step + 1} (lr {lr:.4g}); stopped. "
            f"{keep}. Lower --lr, raise --warmup-epochs, or drop --amp, then retry"
        )

    # -- the whole run
    def run(self) -> dict[str, Any]:
        stop = StopFlag()
        stop.install()
        try:
            self._setup()
            return self._run(stop)
        finally:
            stop.restore()
            if getattr(self, "writer", None) is not None:
                self.writer.close()

    def _run(self, stop: StopFlag) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.wall_start = time.perf_counter()
        self.start_epoch_done = self.start_epoch
        if env.is_main and not cfg.quiet:
            world = f", {env.world} processes" if env.distributed else ""
            print(
                f"training {cfg.model} on {self.data.description}\n"
                f"  {cfg.epochs} epochs x {self.steps_per_epoch} steps, batch {cfg.batch_size}{world}, "
                f"{cfg.opt} lr {cfg.lr:.4g}, img {cfg.img_size}px, device {env.device}, output {self.out}",
                flush=True,
            )
            if self.state is not None:
                print(f"  resumed from epoch {self.start_epoch} step {self.start_step}", flush=True)
        start_step = self.start_step
        for epoch in range(self.start_epoch, cfg.epochs):
            train_m, stopped = self._train_epoch(epoch, start_step, stop)
            start_step = 0
            if stopped:
                steps_done = (self.global_step - epoch * self.steps_per_epoch) if self.global_step else 0
                if env.is_main:
                    self._save_last(epoch, steps_done)
                    self._write_summary(status="interrupted")
                    print(
                        f"stopped by {signal.Signals(stop.signum).name} during epoch {epoch + 1} "
                        f"(step {steps_done}); saved {self.out / 'last.pt'}; continue with --resume",
                        flush=True,
                    )
                raise Interrupted(stop.signum)
            self._end_epoch(epoch, train_m)
        self._finish()
        return self._write_summary(status="completed") if env.is_main else {}

    def _end_epoch(self, epoch: int, train_m: dict[str, float]) -> None:
        cfg, env = self.cfg, self.env
        if env.distributed:
            broadcast_buffers(self.model)
            if self.ema is not None:
                broadcast_buffers(self.ema.module)
        val = evaluate(self.model, self.data.val, self.dcfg, env.device, cfg.channels_last, env.distributed)
        ema_m = None
        if self.ema is not None:
            ema_m = evaluate(self.ema.module, self.data.val, self.dcfg, env.device, cfg.channels_last, env.distributed)
        row = {
            "epoch": epoch + 1,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "train_loss": train_m["loss"],
            "train_top1": train_m["top1"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "ema_loss": ema_m["loss"] if ema_m else None,
            "ema_top1": ema_m["top1"] if ema_m else None,
            "ema_top5": ema_m["top5"] if ema_m else None,
        }
        self.rows.append(row)
        self.start_epoch_done = epoch + 1
        # best of this epoch: the raw model, or the EMA when it scores higher
        source, top1, weights = "model", val["top1"], self.model
        if ema_m and ema_m["top1"] > top1:
            source, top1, weights = "ema", ema_m["top1"], self.ema.module
        improved = top1 > self.best_top1
        if improved:
            self.best_top1, self.best_epoch, self.best_source = top1, epoch + 1, source
        if env.is_main:
            if improved:
                best_sd = ckpt.clean_state_dict(weights.state_dict())
                ckpt.save_atomic(self._checkpoint(epoch + 1, 0, best_sd, source), self.out / "best.pt")
            self._save_last(epoch + 1, 0)
            write_metrics_csv(self.rows, self.out / "metrics.csv")
            if self.writer is not None:
                w = self.writer
                w.add_scalar("train/loss", train_m["loss"], epoch + 1)
                w.add_scalar("train/top1", train_m["top1"], epoch + 1)
                w.add_scalar("train/images_per_second", train_m["images_per_second"], epoch + 1)
                w.add_scalar("train/lr", row["lr"], epoch + 1)
                for k in ("loss", "top1", "top5"):
                    w.add_scalar(f"val/{k}", val[k], epoch + 1)
                    if ema_m:
                        w.add_scalar(f"val_ema/{k}", ema_m[k], epoch + 1)
                w.flush()
            write_curves(self.rows, self.out / "curves.png")
            self._write_summary(status="running")
            ema_txt = f"  ema top1 {ema_m['top1']:.2f}" if ema_m else ""
            self.log.line(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_m['loss']:.4f} top1 {train_m['top1']:.2f}  "
                f"val loss {val['loss']:.4f} top1 {val['top1']:.2f} top5 {val['top5']:.2f}{ema_txt}  "
                f"({train_m['images_per_second']:.0f} img/s)" + ("  *best*" if improved else "")
            )

    def _finish(self) -> None:
        skipped = getattr(self.data.train, "skipped", 0) + getattr(self.data.val, "skipped", 0) + self.data.skipped
        if skipped and self.env.is_main:
            print(f"warning: skipped {skipped} unreadable image(s) (--skip-bad-images)", file=sys.stderr)

    def _write_summary(self, status: str) -> dict[str, Any]:
        cfg = self.cfg
        last = self.rows[-1] if self.rows else {}
        summary = {
            "model": cfg.model,
            "status": status,
            "epochs": cfg.epochs,
            "epochs_completed": len(self.rows),
            "best_top1": self.best_top1 if self.rows else None,
            "best_epoch": self.best_epoch if self.rows else None,
            "best_source": self.best_source if self.rows else None,
            "final_top1": last.get("val_top1"),
            "final_top5": last.get("val_top5"),
            "final_loss": last.get("val_loss"),
            "final_ema_top1": last.get("ema_top1"),
            "train_images_per_second": self.train_images / self.train_time if self.train_time else None,
            "train_time_s": self.train_time,
            "train_seconds": self.train_time,
            "wall_time_s": time.perf_counter() - getattr(self, "wall_start", time.perf_counter()),
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "data": cfg.data,
            "img_size": cfg.img_size,
            "batch_size": cfg.batch_size,
            "world_size": self.env.world,
            "device": str(self.env.device),
            "output": str(self.out),
            "best_checkpoint": str(self.out / "best.pt"),
            "last_checkpoint": str(self.out / "last.pt"),
            "config": cfg.to_dict(),
        }
        _write_atomic(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def _default_workers(env: DistEnv) -> int:
    from .data import default_workers

    return max(1, default_workers() // env.local_world) if available_cores() > 2 else 1


def train(
    cfg: TrainConfig, resume: str | None = None, overwrite: bool = False, resume_if_present: bool = False
) -> dict[str, Any]:
    """Run training; returns the summary (empty on ranks other than 0). See ``TrainConfig``."""
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite)
    trainer.resume_if_present = resume_if_present
    return trainer.run()
