"""One epoch of training and one pass of evaluation, as functions (the shape of torchvision's reference scripts).

``train_one_epoch`` runs the steps of one epoch (AMP, gradient clipping, the per-step schedule, EMA, mixup and
random erasing), advancing a ``TrainState``; it starts mid-epoch when the state says so (a resumed run) and
stops after the step during which a stop was asked (SIGINT / SIGTERM on any process), saving the partial
epoch's meter in the state. ``evaluate`` is ``metrics.evaluate``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..data import DataConfig, normalize
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import DistEnv, epoch_seed
from .logs import Progress
from .metrics import Meter, evaluate
from .signals import StopFlag
from .state import TrainState

__all__ = ["LossNotFinite", "TrainParts", "evaluate", "should_stop", "train_one_epoch"]


@dataclass
class TrainParts:
    """What a training step touches, built once per run (``builders``)."""

    model: nn.Module  # the bare module: state dicts, EMA, gradient clipping
    forward_model: nn.Module  # what runs the batches: DDP and / or compiled around ``model``
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm CosineLRScheduler, stepped per update
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    loss_fn: nn.Module
    ema: Any = None  # timm ModelEmaV3
    erasing: Any = None  # timm RandomErasing, on the normalised batch
    mixup: Any = None  # timm Mixup / CutMix


class LossNotFinite(Exception):
    """The training loss became NaN or infinite at ``epoch`` (0-based), ``step`` (0-based) with ``lr``."""

    def __init__(self, epoch: int, step: int, lr: float, loss: float) -> None:
        super().__init__(f"loss {loss} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.lr, self.loss = epoch, step, lr, loss


def should_stop(stop: StopFlag, env: DistEnv) -> bool:
    """Whether any process was asked to stop; under DDP all processes agree (the signal's number is shared)."""
    if not env.distributed:
        return bool(stop.signum)
    flag = torch.tensor([float(stop.signum)], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not stop.signum:
        stop.signum = int(flag.item())
    return bool(flag.item())


def train_one_epoch(
    parts: TrainParts,
    loader: Any,
    dcfg: DataConfig,
    cfg: TrainConfig,
    env: DistEnv,
    state: TrainState,
    epoch: int,
    progress: Progress,
    stop: StopFlag,
) -> dict[str, float] | None:
    """Train epoch ``epoch`` from step ``state.step_in_epoch``; returns the epoch's loss, top-1 and images per
    second, or None when stopped (``state.step_in_epoch`` and ``state.partial`` then say where). Raises
    ``LossNotFinite`` on a NaN / infinite loss, before the step that would spread it into the weights."""
    start_step = state.step_in_epoch
    seed = epoch_seed(cfg.seed, epoch, env.rank)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    loader.set_epoch(epoch)
    meter = Meter(env.device)
    if start_step:  # resuming mid-epoch: the RNGs and meters as they were at the interruption
        if state.world_size == env.world and state.rng is not None:
            ckpt.set_rng_state(state.rng)
            if state.loader_rng is not None:
                loader.generator.set_state(state.loader_rng)
        if state.partial:
            meter.load(state.partial)
    model, optimizer, scaler = parts.model, parts.optimizer, parts.scaler
    parts.forward_model.train()
    progress.start(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", initial=start_step)
    t0, images = time.perf_counter(), 0
    autocast = torch.autocast(env.device.type, dtype=parts.amp_dtype, enabled=cfg.amp)
    step = start_step
    stopped = False
    for x, y in loader.iterate(start_step):
        x = normalize(x.to(env.device, non_blocking=True), dcfg, cfg.channels_last)
        y = y.to(env.device, non_blocking=True)
        target = y
        if parts.erasing is not None:
            x = parts.erasing(x)
        if parts.mixup is not None:
            x, target = parts.mixup(x, y)
        with autocast:
            logits = parts.forward_model(x)
            loss = parts.loss_fn(logits.float(), target)
        if not torch.isfinite(loss).item():
            raise LossNotFinite(epoch, step, optimizer.param_groups[0]["lr"], float(loss.item()))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        state.global_step += 1
        parts.scheduler.step_update(state.global_step)
        if parts.ema is not None:
            parts.ema.update(model, step=state.global_step)
        meter.add(loss.detach(), logits.detach().float(), y)
        step += 1
        images += y.shape[0]
        progress.update(step, loss=float(loss.item()), lr=optimizer.param_groups[0]["lr"])
        if should_stop(stop, env):
            stopped = True
            break
    progress.close()
    elapsed = time.perf_counter() - t0
    world_images = images * env.world
    state.train_time += elapsed
    state.train_images += world_images
    if stopped:
        state.step_in_epoch, state.partial = step, meter.state()
        return None
    state.step_in_epoch, state.partial = 0, None
    result = meter.reduce(env.distributed)
    result["images_per_second"] = world_images / max(elapsed, 1e-9)
    return result
