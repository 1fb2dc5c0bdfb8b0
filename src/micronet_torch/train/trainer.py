"""The training loop: one process or DDP under torchrun, AMP, EMA, exact resume, metrics and logs.

``train(cfg)`` runs a resolved ``TrainConfig`` and leaves in ``cfg.output``: ``last.pt`` / ``best.pt``
(atomic, every epoch), ``metrics.csv``, ``summary.json``, TensorBoard events and ``curves.png``.
Optimiser, schedule and EMA come from timm; datasets and transforms from torchvision (``micronet_torch.data``).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._env import default_threads
from ..data import build_data, normalize
from . import checkpoint as ckpt
from .builders import (
    build_amp,
    build_augmentation,
    build_ema,
    build_loss,
    build_optimizer,
    build_scheduler,
    build_train_model,
    build_writer,
    loader_workers,
    wrap_model,
)
from .config import TrainConfig, TrainingError, data_config, resolve, validate
from .distributed import broadcast_buffers, epoch_seed, seed_everything, setup_distributed
from .logs import Progress, write_curves, write_metrics_csv
from .metrics import Meter, evaluate
from .resume import check_epochs, merge_resumed, restore_optimizer, restretch_schedule, resumable_config
from .run_folder import check_output_dir, describe_holder, write_summary_file
from .signals import Interrupted, StopFlag


class Trainer:
    """One training run; ``run()`` returns the summary dict written to ``summary.json``."""

    def __init__(
        self, cfg: TrainConfig, resume: str | None = None, overwrite: bool = False, given: Collection[str] | None = None
    ) -> None:
        self.requested, self.resume_from, self.overwrite, self.given = cfg, resume, overwrite, given

    # -- set-up: each piece from its builder (``builders.py``)
    def _setup(self) -> None:
        self.env = env = setup_distributed(self.requested.device)
        self.out = Path(self.requested.output)
        fresh = None if self.resume_from else resolve(self.requested)
        if fresh is not None:  # a new run's settings are checked before its folder exists
            validate(fresh, env.world)
        if env.is_main:  # the folder's lock first: a second run stops here, before reading or cleaning anything
            self.lock = check_output_dir(self.out, resume=self.resume_from is not None, overwrite=self.overwrite)
            if self.lock.took_over:
                print(f"note: the run that held {self.out} ({describe_holder(self.lock.took_over)}) is gone "
                      "(killed or crashed); its stale lock was replaced", flush=True)  # fmt: skip
        if env.distributed:
            dist.barrier()
        self.state = self._resume_state()
        self.schedule_note: str | None = None
        self.cfg = cfg = self._merge_resumed(self.state["config"]) if self.state else fresh or resolve(self.requested)
        if cfg is not fresh:  # a resumed run's (or one --resume found nothing to resume)
            validate(cfg, env.world)
        torch.set_num_threads(cfg.threads or default_threads(cfg.img_size, env.local_world))
        seed_everything(cfg.seed + env.rank)
        self.log = Progress(env.is_main and not cfg.quiet, cfg.log_interval)
        self._setup_data()
        n_cls = len(self.class_names)
        self.model = model = build_train_model(cfg, n_cls, env, self.state)  # the bare module: state dicts, EMA
        self.ema = build_ema(cfg, model, self.state)
        self.optimizer = build_optimizer(cfg, model)
        self.steps_per_epoch = len(self.data.train)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype, self.scaler = build_amp(cfg, env)
        self.forward_model: nn.Module = wrap_model(cfg, model, env)
        self.loss_fn = build_loss(cfg)
        self.erasing, self.mixup = build_augmentation(cfg, env, n_cls)
        self._restore_progress()
        try:
            self.writer = build_writer(self.out, env)
        except OSError as err:
            raise self._failed(err) from err

    def _resume_state(self) -> dict[str, Any] | None:
        """The checkpoint to continue from (``--resume``), or None for a new run."""
        if not self.resume_from:
            return None
        resume_path = self.out / "last.pt" if self.resume_from == "auto" else Path(self.resume_from)
        if not resume_path.is_file():
            if self.resume_from == "auto" and getattr(self, "resume_if_present", False):
                return None
            raise TrainingError(
                f"--resume: no checkpoint at {resume_path}; start without --resume (or point "
                "--output at the run to continue)"
            )
        state = ckpt.load(resume_path)
        if not ckpt.is_training_checkpoint(state) or "config" not in state:
            raise TrainingError(f"--resume {resume_path}: not a micronet training checkpoint (last.pt)")
        state["config"] = resumable_config(state, resume_path).to_dict()  # checked, completed from its recipe
        return state

    def _setup_data(self) -> None:
        cfg, env = self.cfg, self.env
        self.dcfg = data_config(cfg)
        self.data = build_data(
            cfg.data,
            self.dcfg,
            cfg.batch_size // env.world,
            cfg.eval_batch_size,
            loader_workers(cfg, env),
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

    def _restore_progress(self) -> None:
        """Counters, best score and optimiser / schedule state: zero for a new run, the checkpoint's on resume."""
        self.rows: list[dict[str, Any]] = []
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch, self.best_source = -1.0, 0, "model"
        self.train_time, self.train_images = 0.0, 0
        self.partial: list[float] | None = None
        if self.state is not None:
            s = self.state
            restore_optimizer(self.optimizer, self.scheduler, self.scaler, s, self.out)
            self.rows = list(s.get("metrics", []))
            self.start_epoch, self.start_step = int(s["epoch"]), int(s.get("step_in_epoch", 0))
            self.global_step = int(s.get("global_step", self.start_epoch * self.steps_per_epoch))
            self.best_top1, self.best_epoch = float(s.get("best_top1", -1.0)), int(s.get("best_epoch", 0))
            self.best_source = str(s.get("best_source", "model"))
            self.train_time, self.train_images = float(s.get("train_time", 0.0)), int(s.get("train_images", 0))
            self.partial = s.get("partial")
            if self.schedule_note:
                total = self.cfg.epochs * self.steps_per_epoch
                lr = restretch_schedule(self.scheduler, total, self.global_step)
                if self.env.is_main:
                    print(f"{self.schedule_note} (lr now {lr:.4g})", flush=True)

    def _merge_resumed(self, saved: dict[str, Any]) -> TrainConfig:
        """The saved config with the flags given now (``resume.merge_resumed``); changed settings are reported."""
        cfg, changed = merge_resumed(saved, self.requested, self.out, self.given)
        state = self.state or {}
        self.schedule_note = check_epochs(
            cfg, int(saved.get("epochs") or cfg.epochs), int(state.get("epoch", 0)), int(state.get("step_in_epoch", 0)),
            self.out,
        )  # fmt: skip
        changed = [c for c in changed if c != "epochs"]
        if changed and int(os.environ.get("RANK", "0")) == 0:
            print(f"resuming with changed settings: {', '.join(changed)} (the run will differ from the original)")
        return cfg

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
        """Set up and train; the folder's lock is released however the run ends (errors, signals, Ctrl-C).

        A file that cannot be written (full disk, file-size limit, a path that is now a folder) stops the run
        with one line naming the file; the last good checkpoint stays, and ``summary.json`` says ``failed``
        when it can still be written.
        """
        stop = StopFlag()
        stop.install()
        try:
            self._setup()
            try:
                return self._run(stop)
            except OSError as err:
                raise self._failed(err) from err
        finally:
            stop.restore()
            if getattr(self, "writer", None) is not None:
                with contextlib.suppress(OSError):
                    self.writer.close()
            if getattr(self, "lock", None) is not None:
                self.lock.release()

    def _failed(self, err: OSError) -> TrainingError:
        """The one-line error for a failed write; marks the run ``failed`` in ``summary.json`` if it can."""
        name = err.filename2 or err.filename  # os.replace(tmp, target) names the target second
        what = (
            f"{name}: {err.strerror or err}"
            if name and err.strerror and str(name) not in str(err.strerror)
            else err.strerror or str(err)  # the message without its "[Errno N]"
        )
        if getattr(self, "rows", None) is not None and self.env.is_main:
            with contextlib.suppress(OSError):
                self._write_summary(status="failed", error=what)
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint {last} is kept (continue with --resume)" if last.is_file() else ""
        return TrainingError(f"cannot write the run's files: {what}{keep}")

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
        skipped = self.data.all_skipped()
        if skipped and self.env.is_main:
            print(f"warning: skipped {len(skipped)} unreadable image(s) (--skip-bad-images):", file=sys.stderr)
            for path, err in sorted(skipped.items()):
                print(f"  {err if path in err else f'{path}: {err}'}", file=sys.stderr)

    def _write_summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        last = self.rows[-1] if self.rows else {}
        summary = {
            "model": cfg.model,
            "status": status,
            "error": error,
            "pid": os.getpid(),
            "host": socket.gethostname(),
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
        write_summary_file(self.out, summary)
        return summary


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    overwrite: bool = False,
    resume_if_present: bool = False,
    given: Collection[str] | None = None,
) -> dict[str, Any]:
    """Run training; returns the summary (empty on ranks other than 0). See ``TrainConfig``.

    ``given`` names the settings the caller set (on ``--resume`` each one that differs from the saved run is
    a change, even at its default value); None: those that differ from ``TrainConfig()``'s defaults.
    """
    trainer = Trainer(cfg, resume=resume, overwrite=overwrite, given=given)
    trainer.resume_if_present = resume_if_present
    return trainer.run()
