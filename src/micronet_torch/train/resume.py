"""What ``--resume`` may change, and what each change does (``docs/training.md``, "Resuming").

A resumed run continues from its checkpoint: model, optimiser, schedule, EMA, counters and RNG states. Flags
given on top of ``--resume`` fall in four groups:

- **runtime** settings (``RUNTIME_FIELDS``: workers, device, threads, quiet, ...) change nothing in the numbers
  and are taken silently;
- **``--epochs``** changes the schedule's length: the cosine is *re-stretched* over the new total, and from the
  current step on the learning rate follows that schedule (as if the run had been planned that long from the
  start; steps already trained keep theirs). The new lr is printed. An ``--epochs`` at or below the epochs
  already finished would train nothing and is refused;
- **applied** settings (augmentation, regularisation, EMA, AMP, the data pipeline, the seed) take effect from
  the next step, with a warning that the run now differs from the original;
- **refused** settings (``REFUSED_ON_RESUME``: the optimiser, its learning rate and decay, the batch size, the
  model and its inputs, the recipe, ``--pretrained``) would be overwritten by the checkpoint's optimiser and
  schedule or do not fit its weights, so they would silently do nothing: they stop the run with how to
  fine-tune instead (``micronet train --pretrained OUT/last.pt --output NEW ...``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import fields
from pathlib import Path
from typing import Any

from .._text import one_line
from ..models import resolve_name
from .config import RUNTIME_FIELDS, TrainConfig, TrainingError, check_types, resolve, validate

# the checkpoint's optimiser / schedule state overwrites these, or its weights do not fit them
REFUSED_ON_RESUME = (
    "recipe",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_epochs",
    "warmup_lr",
    "opt",
    "momentum",
    "weight_decay",
    "wd_all",
    "in_chans",
    "pretrained",
    "model_kwargs",
)


# what a checkpoint must hold to be resumed, and the type of each progress entry it may hold
REQUIRED_ON_RESUME = ("model", "optimizer", "scheduler", "class_names", "epoch", "config")
PROGRESS_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "class_names": (list, tuple),
    "config": (dict,),
    "metrics": (list,),
    "epoch": (int,),
    "step_in_epoch": (int,),
    "global_step": (int,),
    "best_epoch": (int,),
    "train_images": (int,),
    "world_size": (int,),
    "best_top1": (int, float),
    "train_time": (int, float),
    "best_source": (str,),
}


def resumable_config(state: dict[str, Any], path: Path) -> TrainConfig:
    """The config a checkpoint was trained with, checked before any work: the progress entries of their types,
    the saved settings of theirs (a string is not a number), missing ones (a checkpoint of another version)
    filled from its recipe, and the whole passing ``validate`` (an ``img_size`` of 100,000 would ask for tens
    of GB). Raises ``TrainingError`` naming the checkpoint and the entry."""
    where = f"--resume {path}"
    fine_tune = f"fine-tune from its weights instead: micronet train --pretrained {path} --output NEW_FOLDER"
    missing = [key for key in REQUIRED_ON_RESUME if key not in state]
    if missing:
        raise TrainingError(
            f"{where}: the checkpoint has no {', '.join(missing)}, so it cannot be resumed; {fine_tune}"
        )
    for key, kinds in PROGRESS_TYPES.items():
        value = state.get(key)
        if key in state and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise TrainingError(f"{where}: the checkpoint's {key} is a {type(value).__name__}, not a "
                                f"{' or '.join(k.__name__ for k in kinds)}; {fine_tune}")  # fmt: skip
    if not all(isinstance(name, str) for name in state["class_names"]) or not state["class_names"]:
        raise TrainingError(f"{where}: the checkpoint's class_names are not a list of names; {fine_tune}")
    if state["epoch"] < 0 or state.get("step_in_epoch", 0) < 0:
        raise TrainingError(f"{where}: the checkpoint's epoch {state['epoch']} is not a count of epochs; {fine_tune}")
    try:
        check_types(state["config"])
        cfg = resolve(TrainConfig.from_dict(state["config"]))
        validate(cfg, 1)  # the batch's split over processes is checked again with the flags given now
    except ValueError as err:  # TrainingError, or an unknown model / recipe
        raise TrainingError(f"{where}: its saved config is not usable ({err}); {fine_tune}") from err
    return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given_settings(requested: TrainConfig) -> set[str]:
    """The settings of ``requested`` that differ from ``TrainConfig()``'s: what a caller that cannot say which
    settings it set (a library call without ``given``) is taken to have set."""
    default = TrainConfig()
    return {f.name for f in fields(TrainConfig) if getattr(requested, f.name) != getattr(default, f.name)}


def merge_resumed(
    saved: dict[str, Any], requested: TrainConfig, out: Path, given: Collection[str] | None = None
) -> tuple[TrainConfig, list[str]]:
    """The saved (resolved) config with the settings given now on top; returns it and the changed settings.

    ``given`` names the settings the user set (``micronet train`` passes the flags typed on the command line),
    so that a flag typed with its default value (``--mixup 0`` on a ``--mixup 0.2`` run, ``--seed 0`` on a
    ``--seed 5`` one) counts as a change like any other; without it, the settings that differ from
    ``TrainConfig()``'s defaults count (``given_settings``). Refuses a different model and every setting of
    ``REFUSED_ON_RESUME``, naming the way to fine-tune instead.
    """
    base = TrainConfig.from_dict(saved)
    given = given_settings(requested) if given is None else set(given)
    changed: list[str] = []
    refused: list[str] = []
    for f in fields(TrainConfig):
        new = getattr(requested, f.name)
        if f.name not in given or new is None or new == getattr(base, f.name):
            continue
        if f.name == "model":
            try:
                new_name = resolve_name(new)[0].name
            except ValueError:
                new_name = new
            if new_name != base.model:
                raise TrainingError(
                    f"--resume: {out}/last.pt is a {base.model} run, not {new}; resume it with "
                    f"--model {base.model} or train {new} in another --output"
                )
            continue
        if f.name in REFUSED_ON_RESUME:
            refused.append(f"{_flag(f.name)} {new} (the run has {getattr(base, f.name)})")
            continue
        setattr(base, f.name, new)
        if f.name not in RUNTIME_FIELDS:
            changed.append(f.name)
    if refused:
        raise TrainingError(
            f"--resume cannot change {', '.join(refused)}: the checkpoint's optimiser and schedule (or weights) "
            f"would override it, so it would do nothing. To train on with new settings, fine-tune: micronet train "
            f"--pretrained {out}/last.pt --output NEW_FOLDER ... (see docs/training.md, Resuming)"
        )
    base.output = str(out)
    return base, changed


def check_epochs(cfg: TrainConfig, saved_epochs: int, done_epochs: int, step_in_epoch: int, out: Path) -> str | None:
    """Refuse an ``--epochs`` that would train nothing; return the line describing a changed schedule (or None)."""
    if cfg.epochs == saved_epochs:
        return None
    if cfg.epochs <= done_epochs:
        partial = f" and {step_in_epoch} steps of epoch {done_epochs + 1}" if step_in_epoch else ""
        raise TrainingError(
            f"--resume --epochs {cfg.epochs}: the run in {out} has already trained {done_epochs} epochs{partial}, "
            f"so it would train nothing. Give --epochs above {done_epochs} to train further, or fine-tune from its "
            f"weights: micronet train --pretrained {out}/last.pt --output NEW_FOLDER --epochs N"
        )
    return (
        f"--epochs {cfg.epochs} (was {saved_epochs}): the cosine schedule is re-stretched over {cfg.epochs} epochs; "
        f"from epoch {done_epochs + 1} on the learning rate follows it"
    )


def restretch_schedule(scheduler: Any, total_steps: int, global_step: int) -> float:
    """Point a resumed timm ``CosineLRScheduler`` at the new total and set the lr for ``global_step``; returns it."""
    scheduler.t_initial = total_steps
    scheduler.step_update(global_step)
    return float(scheduler.optimizer.param_groups[0]["lr"])


def restore_optimizer(optimizer: Any, scheduler: Any, scaler: Any, state: dict[str, Any], out: Path) -> None:
    """Load a resumed checkpoint's optimiser, schedule and gradient-scaler states; states that do not fit the
    run (another optimiser, a spoiled file) are a ``TrainingError`` saying how to fine-tune instead."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise TrainingError(
            f"--resume: the checkpoint's optimiser or schedule state does not fit this run ({one_line(err, 200)}); "
            f"fine-tune from its weights instead: micronet train --pretrained {out}/last.pt --output NEW_FOLDER"
        ) from err
