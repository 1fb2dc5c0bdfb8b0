"""Training: the config with its recipes as data, the loop (one process or DDP under torchrun), checkpoints.

``train(cfg)`` runs a ``TrainConfig``; ``python -m micronet_torch.train`` (what torchrun launches) parses the
same flags as ``micronet train``.
"""

from .config import RUNTIME_FIELDS, TrainConfig, TrainingError, data_config, resolve, validate
from .distributed import DistEnv, epoch_seed, seed_everything, setup_distributed
from .logs import CSV_FIELDS, Progress, write_curves, write_metrics_csv
from .metrics import Meter, evaluate
from .recipes import RECIPES, Recipe, paper_weight_decay, recipe_values
from .run_folder import check_output_dir
from .signals import Interrupted, StopFlag
from .trainer import Trainer, train

__all__ = [
    "CSV_FIELDS",
    "RECIPES",
    "RUNTIME_FIELDS",
    "DistEnv",
    "Interrupted",
    "Meter",
    "Progress",
    "Recipe",
    "StopFlag",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "check_output_dir",
    "data_config",
    "epoch_seed",
    "evaluate",
    "paper_weight_decay",
    "recipe_values",
    "resolve",
    "seed_everything",
    "setup_distributed",
    "train",
    "validate",
    "write_curves",
    "write_metrics_csv",
]
