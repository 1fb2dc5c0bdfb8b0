"""A run's progress and the training checkpoint that carries it: the checkpoint's schema in one place, versioned.

``TrainState`` is what a run has done (epochs and steps, the metrics rows, the best score, training time and
images) and what it needs to go on exactly where it stopped (the RNG states, the loader's generator, the
partial epoch's meter). ``state_dict`` builds the checkpoint (``last.pt`` / ``best.pt``: the weights, the
optimiser, schedule, EMA and gradient-scaler states, the config and this progress) and ``from_checkpoint``
reads one back. Checkpoints of older versions are read too: one without ``version`` is version 1, and every
progress entry a version lacks takes its new-run value; a checkpoint of a newer version is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig
from . import checkpoint as ckpt
from .config import TrainConfig, TrainingError
from .resume import resumable_config

CHECKPOINT_FORMAT = "micronet-torch-train"
CHECKPOINT_VERSION = 1  # raise it when an entry changes meaning; ``from_checkpoint`` then reads both


@dataclass
class TrainState:
    """How far a run has come; ``epoch`` counts finished epochs, ``step_in_epoch`` the steps of the next one."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_top1: float = -1.0
    best_epoch: int = 0
    best_source: str = "model"
    train_time: float = 0.0
    train_images: int = 0
    partial: list[float] | None = None  # the interrupted epoch's meter (``Meter.state``)
    # what a resumed checkpoint saved to continue mid-epoch (None on a new run)
    rng: dict[str, Any] | None = None
    loader_rng: torch.Tensor | None = None
    world_size: int = 1

    def state_dict(
        self,
        *,
        model: Mapping[str, torch.Tensor],
        source: str,
        cfg: TrainConfig,
        class_names: list[str],
        data_config: DataConfig,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        ema: Any,
        scaler: torch.amp.GradScaler,
        world_size: int,
        loader: Any,
        float_model: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The checkpoint: ``model`` (clean CPU weights) from ``source`` ("model" or "ema") with this progress,
        the optimiser, schedule, EMA and scaler states, and the RNG states as they are now. A ``--qat`` run's
        ``model`` is its int8 graph (``deploy.qat.QatNet``); ``float_model`` then holds the float network it
        started from, so a reader that does not know QAT still gets a working model."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": dict(model),
            "float_model": dict(float_model) if float_model is not None else None,
            "model_name": cfg.model,
            "model_kwargs": dict(cfg.model_kwargs or {}),
            "model_source": source,
            "num_classes": len(class_names),
            "in_chans": cfg.in_chans,
            "img_size": cfg.img_size,
            "class_names": list(class_names),
            "data_config": data_config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ckpt.clean_state_dict(ema.module.state_dict()) if ema is not None else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": cfg.to_dict(),
            "metrics": list(self.metrics),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_source": self.best_source,
            "train_time": self.train_time,
            "train_images": self.train_images,
            "world_size": world_size,
            "rng": ckpt.rng_state(),
            "loader_rng": loader.generator.get_state() if hasattr(loader, "generator") else None,
            "partial": self.partial,
            "torch_version": str(torch.__version__),
        }

    def save(self, path: str | os.PathLike, **parts: Any) -> Path:
        """Write ``state_dict(**parts)`` to ``path`` atomically (``checkpoint.save_atomic``)."""
        return ckpt.save_atomic(self.state_dict(**parts), path)

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], steps_per_epoch: int = 0) -> TrainState:
        """The progress saved in ``state``; entries an older version lacks take their new-run values
        (``global_step``: the finished epochs times ``steps_per_epoch``)."""
        epoch = int(state["epoch"])
        return cls(
            epoch=epoch,
            step_in_epoch=int(state.get("step_in_epoch", 0)),
            global_step=int(state.get("global_step", epoch * steps_per_epoch)),
            metrics=list(state.get("metrics", [])),
            best_top1=float(state.get("best_top1", -1.0)),
            best_epoch=int(state.get("best_epoch", 0)),
            best_source=str(state.get("best_source", "model")),
            train_time=float(state.get("train_time", 0.0)),
            train_images=int(state.get("train_images", 0)),
            partial=state.get("partial"),
            rng=state.get("rng"),
            loader_rng=state.get("loader_rng"),
            world_size=int(state.get("world_size", 1)),
        )


def checkpoint_version(state: Mapping[str, Any]) -> int:
    """The schema version of a training checkpoint: its ``version``, 1 when it has none."""
    version = state.get("version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 0


def read_resumable(path: Path) -> dict[str, Any]:
    """A training checkpoint to resume, checked before any work: its format, its version (this one or older)
    and its progress and config (``resume.resumable_config``); ``config`` comes back resolved, as a dict."""
    state = ckpt.load(path)
    if not ckpt.is_training_checkpoint(state) or "config" not in state:
        raise TrainingError(f"--resume {path}: not a micronet training checkpoint (last.pt)")
    version = checkpoint_version(state)
    if not 1 <= version <= CHECKPOINT_VERSION:
        raise TrainingError(
            f"--resume {path}: checkpoint version {state.get('version')!r}, this micronet-torch reads versions 1 "
            f"to {CHECKPOINT_VERSION}; resume it with the micronet-torch that wrote it, or upgrade"
        )
    state["config"] = resumable_config(state, path).to_dict()  # checked, completed from its recipe
    return state
