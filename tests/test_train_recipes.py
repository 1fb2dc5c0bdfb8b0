"""Recipes as data and the trainer's builders, each on its own."""

from __future__ import annotations

import math

import pytest
import torch

from micronet_torch.train import RECIPES, TrainConfig, TrainingError, paper_weight_decay, recipe_values, resolve
from micronet_torch.train.builders import build_amp, build_loss, build_optimizer, build_scheduler, wrap_model
from micronet_torch.train.distributed import DistEnv


def test_recipes_are_tables_of_values() -> None:
    assert set(RECIPES) >= {"default", "paper"}
    paper = recipe_values(RECIPES["paper"], "micronet_m3", None, None, None)
    assert (paper["batch_size"], paper["warmup_epochs"], paper["weight_decay"]) == (512, 5.0, 4e-5)
    assert paper["lr"] == pytest.approx(0.2)  # 0.1 per 256 images, linear
    m0 = recipe_values(RECIPES["paper"], "micronet_m0", None, 128, None)
    assert (m0["lr"], m0["weight_decay"], m0["warmup_epochs"]) == (pytest.approx(0.05), 3e-5, 0.0)
    assert paper_weight_decay("micronet_m3") == 4e-5 and paper_weight_decay("micronet_m1") == 3e-5
    small = recipe_values(RECIPES["default"], "micronet_m0", 10, 256, "sgd")
    assert small["lr"] == pytest.approx(0.1 * math.sqrt(4)) and small["weight_decay"] == 5e-5
    assert small["warmup_epochs"] == pytest.approx(1.0)  # 10 % of 10 epochs
    adam = recipe_values(RECIPES["default"], "micronet_m0", None, None, None)
    assert adam["lr"] == pytest.approx(4e-3 * math.sqrt(2)) and adam["weight_decay"] == 0.05


def test_resolve_fills_from_the_recipe_and_keeps_given_values() -> None:
    cfg = resolve(TrainConfig(img_size=48, lr=0.01))
    assert (cfg.lr, cfg.pad, cfg.epochs, cfg.opt) == (0.01, 3, 15, "adamw")  # pad: img // 16 in the default
    assert resolve(TrainConfig(recipe="paper")).pad == 224 // 8
    with pytest.raises(TrainingError, match="--recipe 'fast' is unknown"):
        resolve(TrainConfig(recipe="fast"))


def test_builders_one_by_one() -> None:
    cfg = resolve(TrainConfig(epochs=2, warmup_epochs=1.0))
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(cfg, model)
    assert type(opt).__name__ == "AdamW" and opt.param_groups[0]["lr"] == pytest.approx(cfg.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch=10)
    sched.step_update(5)  # half-way through the warm-up (linear from warmup_lr)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) / 2)
    sched.step_update(10)  # the cosine runs over the whole run, warm-up included: half-way, half the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr / 2)
    sched.step_update(20)
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.min_lr, abs=1e-9)
    env = DistEnv()
    dtype, scaler = build_amp(cfg, env)
    assert dtype == torch.bfloat16 and not scaler.is_enabled()  # CPU: bf16, no scaler
    assert wrap_model(cfg, model, env) is model  # one process, no compile: the bare module
    assert isinstance(build_loss(cfg), torch.nn.CrossEntropyLoss)
