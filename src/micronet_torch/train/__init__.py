"""Training: the config with its recipes as data, the loop (one process or DDP under torchrun), checkpoints.

``train(cfg)`` runs a ``TrainConfig``; ``python -m micronet_torch.train`` (what torchrun launches) parses the
same flags as ``micronet train``.
"""

from __future__ import annotations

import importlib
from typing import Any

# each public name and the module that holds it, imported on first use (PEP 562): the command line reads the
# recipes (``train.recipes``) to build its parser without loading torch, timm and the training loop
_HOMES = {
    "RUNTIME_FIELDS": "config", "TrainConfig": "config", "TrainingError": "config", "data_config": "config",
    "resolve": "config", "validate": "config",
    "DistEnv": "distributed", "epoch_seed": "distributed", "seed_everything": "distributed",
    "setup_distributed": "distributed",
    "CSV_FIELDS": "logs", "Progress": "logs", "write_curves": "logs", "write_metrics_csv": "logs",
    "Meter": "metrics", "evaluate": "metrics",
    "LossNotFinite": "loop", "TrainParts": "loop", "train_one_epoch": "loop",
    "RunLog": "run_log", "read_summary": "run_log",
    "CHECKPOINT_VERSION": "state", "TrainState": "state",
    "RECIPES": "recipes", "Recipe": "recipes", "paper_weight_decay": "recipes", "recipe_values": "recipes",
    "check_output_dir": "run_folder",
    "Interrupted": "signals", "StopFlag": "signals",
    "Trainer": "trainer", "train": "trainer",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "CHECKPOINT_VERSION",
    "CSV_FIELDS",
    "RECIPES",
    "RUNTIME_FIELDS",
    "DistEnv",
    "Interrupted",
    "LossNotFinite",
    "Meter",
    "Progress",
    "Recipe",
    "RunLog",
    "StopFlag",
    "TrainConfig",
    "TrainParts",
    "TrainState",
    "Trainer",
    "TrainingError",
    "check_output_dir",
    "data_config",
    "epoch_seed",
    "evaluate",
    "paper_weight_decay",
    "read_summary",
    "recipe_values",
    "resolve",
    "seed_everything",
    "setup_distributed",
    "train",
    "train_one_epoch",
    "validate",
    "write_curves",
    "write_metrics_csv",
]
