"""The training run: one process or DDP under torchrun, AMP, EMA, exact resume, metrics and logs.

``train(cfg)`` runs a resolved ``TrainConfig`` and leaves in ``cfg.output``: ``last.pt`` / ``best.pt``
(atomic, every epoch), ``metrics.csv``, ``summary.json``, TensorBoard events and ``curves.png``. The pieces:
``loop.train_one_epoch`` and ``loop.evaluate`` (the steps), ``state.TrainState`` (progress and the checkpoint
schema), ``run_log.RunLog`` (the files people read); ``Trainer`` sets them up and runs the epochs.
Optimiser, schedule and EMA come from timm; datasets and transforms from torchvision (``micronet_torch.data``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._env import default_threads
from ..data import build_data
from . import checkpoint as ckpt
from .builders import (
    build_amp,
    build_augmentation,
    build_ema,
    build_loss,
    build_optimizer,
    build_scheduler,
    build_train_model,
    loader_workers,
    wrap_model,
)
from .config import TrainConfig, TrainingError, data_config, resolve, validate
from .distributed import broadcast_buffers, seed_everything, setup_distributed
from .logs import Progress
from .loop import LossNotFinite, TrainParts, evaluate, train_one_epoch
from .resume import check_epochs, merge_resumed, restore_optimizer, restretch_schedule
from .run_folder import Lock, check_output_dir, describe_holder, read_summary
from .run_log import RunLog
from .signals import Interrupted, StopFlag
from .state import TrainState, read_resumable


class Trainer:
    """One training run; ``run()`` returns the summary dict written to ``summary.json``.

    Set up by ``_setup`` (each piece from its builder), then ``_run`` trains epoch after epoch
    (``loop.train_one_epoch``), evaluating and saving after each (``_end_epoch``).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: str | None = None,
        overwrite: bool = False,
        given: Collection[str] | None = None,
        resume_if_present: bool = False,
    ) -> None:
        self.requested, self.resume_from, self.overwrite, self.given = cfg, resume, overwrite, given
        self.resume_if_present = resume_if_present
        self.out = Path(cfg.output)
        self.lock: Lock | None = None
        self.run_log: RunLog | None = None  # from the start of ``_setup``
        self.state: TrainState | None = None  # once the run's progress is known (new or resumed)

    # -- set-up: each piece from its builder (``builders.py``)
    def _setup(self) -> None:
        self.env = env = setup_distributed(self.requested.device)
        self.run_log = RunLog(self.out, env.is_main)
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
        resumed = self._resume_checkpoint()
        schedule_note = None
        if resumed is not None:
            cfg, schedule_note = self._merge_resumed(resumed)
        else:
            cfg = fresh or resolve(self.requested)
        self.cfg = cfg
        if cfg is not fresh:  # a resumed run's (or one --resume found nothing to resume)
            validate(cfg, env.world)
        torch.set_num_threads(cfg.threads or default_threads(cfg.img_size, env.local_world))
        seed_everything(cfg.seed + env.rank)
        self.progress = Progress(env.is_main and not cfg.quiet, cfg.log_interval)
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
        self.class_names = names = self.data.class_names
        if resumed is not None and list(resumed["class_names"]) != names:
            raise TrainingError(
                f"--resume: the checkpoint was trained on classes {resumed['class_names'][:5]}..., the data "
                f"now has {names[:5]}...; resume with the same --data"
            )
        model = build_train_model(cfg, len(names), env, resumed)  # the bare module: state dicts, EMA
        ema = build_ema(cfg, model, resumed)
        optimizer = build_optimizer(cfg, model)
        steps_per_epoch = len(self.data.train)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
        amp_dtype, scaler = build_amp(cfg, env)
        erasing, mixup = build_augmentation(cfg, env, len(names))
        self.parts = TrainParts(
            model=model,
            forward_model=wrap_model(cfg, model, env),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            amp_dtype=amp_dtype,
            loss_fn=build_loss(cfg),
            ema=ema,
            erasing=erasing,
            mixup=mixup,
        )
        self.resumed = resumed is not None
        if resumed is None:
            self.state = TrainState()
        else:
            restore_optimizer(optimizer, scheduler, scaler, resumed, self.out)
            self.state = TrainState.from_checkpoint(resumed, steps_per_epoch)
            if schedule_note:
                lr = restretch_schedule(scheduler, cfg.epochs * steps_per_epoch, self.state.global_step)
                if env.is_main:
                    print(f"{schedule_note} (lr now {lr:.4g})", flush=True)
        try:
            self.run_log.open()  # TensorBoard: a file in its place fails here, with the summary marked failed
        except OSError as err:
            raise self._failed(err) from err

    def _resume_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to continue from (``--resume``), checked (``state.read_resumable``), or None."""
        if not self.resume_from:
            return None
        resume_path = self.out / "last.pt" if self.resume_from == "auto" else Path(self.resume_from)
        if not resume_path.is_file():
            if self.resume_from == "auto" and self.resume_if_present:
                return None
            raise TrainingError(
                f"--resume: no checkpoint at {resume_path}; start without --resume (or point "
                "--output at the run to continue)"
            )
        return read_resumable(resume_path)

    def _merge_resumed(self, resumed: dict[str, Any]) -> tuple[TrainConfig, str | None]:
        """The saved config with the flags given now (``resume.merge_resumed``), changed settings reported; and
        the line describing a changed schedule (``resume.check_epochs``), or None."""
        saved = resumed["config"]
        cfg, changed = merge_resumed(saved, self.requested, self.out, self.given)
        note = check_epochs(
            cfg, int(saved.get("epochs") or cfg.epochs), int(resumed.get("epoch", 0)),
            int(resumed.get("step_in_epoch", 0)), self.out,
        )  # fmt: skip
        changed = [c for c in changed if c != "epochs"]
        if changed and int(os.environ.get("RANK", "0")) == 0:
            print(f"resuming with changed settings: {', '.join(changed)} (the run will differ from the original)")
        return cfg, note

    # -- checkpoints and summary
    def _save(self, path: Path, model: torch.nn.Module, source: str) -> None:
        """Write the checkpoint of ``model``'s weights (from ``source``) and the run's progress to ``path``."""
        p = self.parts
        assert self.state is not None
        self.state.save(
            path,
            model=ckpt.clean_state_dict(model.state_dict()),
            source=source,
            cfg=self.cfg,
            class_names=self.class_names,
            data_config=self.dcfg,
            optimizer=p.optimizer,
            scheduler=p.scheduler,
            ema=p.ema,
            scaler=p.scaler,
            world_size=self.env.world,
            loader=self.data.train,
            float_model=getattr(p.model, "source_state", None),
        )

    def _write_summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        assert self.state is not None and self.run_log is not None
        return self.run_log.summary(
            status, self.cfg, self.state, self.class_names, self.env.world, str(self.env.device), error
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
            if self.run_log is not None:
                self.run_log.close()
            if self.lock is not None:
                self.lock.release()

    def _failed(self, err: OSError) -> TrainingError:
        """The one-line error for a failed write; marks the run ``failed`` in ``summary.json`` if it can."""
        name = err.filename2 or err.filename  # os.replace(tmp, target) names the target second
        what = (
            f"{name}: {err.strerror or err}"
            if name and err.strerror and str(name) not in str(err.strerror)
            else err.strerror or str(err)  # the message without its "[Errno N]"
        )
        if self.state is not None:
            with contextlib.suppress(OSError):
                self._write_summary(status="failed", error=what)
        last = self.out / "last.pt"
        keep = f"; the last good checkpoint {last} is kept (continue with --resume)" if last.is_file() else ""
        return TrainingError(f"cannot write the run's files: {what}{keep}")

    def _diverged(self, err: LossNotFinite) -> TrainingError:
        """The error for a NaN / infinite loss; marks the run ``diverged`` in ``summary.json``."""
        assert self.state is not None
        last = self.out / "last.pt"
        keep = (
            f"the last good checkpoint is {last} (after epoch {self.state.epoch})"
            if last.exists()
            else "no epoch had finished, so no checkpoint was written"
        )
        self._write_summary(status="diverged")
        return TrainingError(
            f"the training loss became {err.loss} at epoch {err.epoch + 1}, step {err.step + 1} (lr {err.lr:.4g}); "
            f"stopped. {keep}. Lower --lr, raise --warmup-epochs, or drop --amp, then retry"
        )

    def _run(self, stop: StopFlag) -> dict[str, Any]:
        cfg, env, state = self.cfg, self.env, self.state
        assert state is not None
        if env.is_main and not cfg.quiet:
            world = f", {env.world} processes" if env.distributed else ""
            print(
                f"training {cfg.model} on {self.data.description}\n"
                f"  {cfg.epochs} epochs x {len(self.data.train)} steps, batch {cfg.batch_size}{world}, "
                f"{cfg.opt} lr {cfg.lr:.4g}, img {cfg.img_size}px, device {env.device}, output {self.out}",
                flush=True,
            )
            if self.resumed:
                print(f"  resumed from epoch {state.epoch} step {state.step_in_epoch}", flush=True)
        for epoch in range(state.epoch, cfg.epochs):
            try:
                train_m = train_one_epoch(
                    self.parts, self.data.train, self.dcfg, cfg, env, state, epoch, self.progress, stop
                )
            except LossNotFinite as err:
                raise self._diverged(err) from None
            if train_m is None:
                if env.is_main:
                    self._save(self.out / "last.pt", self.parts.model, "model")
                    self._write_summary(status="interrupted")
                    print(
                        f"stopped by {signal.Signals(stop.signum).name} during epoch {epoch + 1} "
                        f"(step {state.step_in_epoch}); saved {self.out / 'last.pt'}; continue with --resume",
                        flush=True,
                    )
                raise Interrupted(stop.signum)
            self._end_epoch(epoch, train_m)
        self._finish()
        return self._write_summary(status="completed") if env.is_main else {}

    def _end_epoch(self, epoch: int, train_m: dict[str, float]) -> None:
        """Evaluate the model (and its EMA), record the epoch, save ``best.pt`` / ``last.pt`` and the logs."""
        cfg, env, state, p = self.cfg, self.env, self.state, self.parts
        assert state is not None
        if env.distributed:
            broadcast_buffers(p.model)
            if p.ema is not None:
                broadcast_buffers(p.ema.module)
        val = evaluate(p.model, self.data.val, self.dcfg, env.device, cfg.channels_last, env.distributed)
        ema_m = None
        if p.ema is not None:
            ema_m = evaluate(p.ema.module, self.data.val, self.dcfg, env.device, cfg.channels_last, env.distributed)
        row = {
            "epoch": epoch + 1,
            "lr": float(p.optimizer.param_groups[0]["lr"]),
            "train_loss": train_m["loss"],
            "train_top1": train_m["top1"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "ema_loss": ema_m["loss"] if ema_m else None,
            "ema_top1": ema_m["top1"] if ema_m else None,
            "ema_top5": ema_m["top5"] if ema_m else None,
        }
        state.metrics.append(row)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        # best of this epoch: the raw model, or the EMA when it scores higher
        source, top1, weights = "model", val["top1"], p.model
        if ema_m and ema_m["top1"] > top1:
            source, top1, weights = "ema", ema_m["top1"], p.ema.module
        improved = top1 > state.best_top1
        if improved:
            state.best_top1, state.best_epoch, state.best_source = top1, epoch + 1, source
        if env.is_main:
            if improved:
                self._save(self.out / "best.pt", weights, source)
            self._save(self.out / "last.pt", p.model, "model")
            assert self.run_log is not None
            self.run_log.epoch(state.metrics, train_m, val, ema_m)
            self._write_summary(status="running")
            ema_txt = f"  ema top1 {ema_m['top1']:.2f}" if ema_m else ""
            self.progress.line(
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

    ``cfg.qat`` without ``cfg.pretrained`` is two runs (``float_then_qat``): the float network first, then the
    quantization-aware fine-tuning of its best checkpoint.
    """
    if cfg.qat and not cfg.pretrained:
        return float_then_qat(cfg, resume, overwrite, resume_if_present, given)
    return Trainer(cfg, resume=resume, overwrite=overwrite, given=given, resume_if_present=resume_if_present).run()


FLOAT_PHASE = "float"  # the float run's folder inside a two-phase --qat run's output
# settings a two-phase --qat run gives its float phase only: the fine-tuning takes the qat recipe's
QAT_RECIPE_FIELDS = (
    "epochs", "lr", "min_lr", "warmup_epochs", "warmup_lr", "opt", "weight_decay", "wd_all", "label_smoothing",
    "drop_rate",
)  # fmt: skip


def float_then_qat(
    cfg: TrainConfig,
    resume: str | None = None,
    overwrite: bool = False,
    resume_if_present: bool = False,
    given: Collection[str] | None = None,
) -> dict[str, Any]:
    """``--qat`` from scratch: QAT fine-tunes the int8 graph of a trained float network (its BatchNorm folded,
    so it needs trained statistics), so the float network is trained first, in ``OUTPUT/float`` (the recipe
    asked for, or the default one, and every setting given), then fine-tuned in ``OUTPUT`` from
    ``OUTPUT/float/best.pt`` with the ``qat`` recipe (its epochs and rates; the float run's image size, the other
    settings given). ``--resume`` continues whichever phase was cut short (a finished float phase is
    not trained again); returns the fine-tuning's summary, with the float run's under ``float_run``."""
    float_out = Path(cfg.output) / FLOAT_PHASE
    float_cfg = replace(cfg, qat=False, output=str(float_out), recipe="default" if cfg.recipe == "qat" else cfg.recipe)
    float_given = None if given is None else set(given) - {"qat"}
    continuing = bool(resume) or resume_if_present
    if int(os.environ.get("RANK", "0")) == 0 and not cfg.quiet:
        print(f"--qat without --pretrained: training the float network first ({float_out}), then its int8 graph")
    done = _completed_summary(float_out, cfg.epochs) if continuing else None
    float_summary = done or train(
        float_cfg, resume="auto" if continuing else None, overwrite=overwrite, resume_if_present=True,
        given=float_given,
    )  # fmt: skip
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every process reads the best.pt the first one wrote
    trained = TrainConfig.from_dict(float_summary["config"]) if float_summary else resolve(float_cfg)
    qat_cfg = replace(
        cfg, recipe="qat", pretrained=str(float_out / "best.pt"), img_size=trained.img_size,
        amp=False, compile=False, sync_bn=False, mixup=0.0, cutmix=0.0, reprob=0.0,
        **dict.fromkeys(QAT_RECIPE_FIELDS),
    )  # fmt: skip
    summary = train(qat_cfg, resume="auto" if continuing else None, overwrite=overwrite, resume_if_present=True)
    if summary:
        summary["float_run"] = {k: float_summary.get(k) for k in ("output", "best_top1", "epochs_completed")}
    return summary


def _completed_summary(out: Path, epochs: int | None) -> dict[str, Any] | None:
    """The ``summary.json`` of a completed run in ``out`` (with its ``best.pt``, and at least ``epochs`` epochs
    when given), else None."""
    try:
        summary = read_summary(out / "summary.json")
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "completed" or not (out / "best.pt").is_file():
        return None
    return summary if epochs is None or int(summary.get("epochs_completed") or 0) >= epochs else None
