"""The pieces of a training run on their own: TrainState (the checkpoint's schema) and RunLog (the run's records)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from micronet_torch.train import TrainConfig, TrainingError, data_config, resolve
from micronet_torch.train import checkpoint as ckpt
from micronet_torch.train.run_log import SUMMARY_KEYS, RunLog, read_summary
from micronet_torch.train.state import CHECKPOINT_VERSION, TrainState, checkpoint_version, read_resumable

PROGRESS = ("epoch", "step_in_epoch", "global_step", "metrics", "best_top1", "best_epoch", "best_source",
            "train_time", "train_images", "partial")  # fmt: skip


def parts(cfg: TrainConfig) -> dict:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return dict(
        model=ckpt.clean_state_dict(model.state_dict()),
        source="model",
        cfg=cfg,
        class_names=["a", "b", "c"],
        data_config=data_config(cfg),
        optimizer=optimizer,
        scheduler=CosineLRScheduler(optimizer, t_initial=10),
        ema=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        world_size=1,
        loader=object(),
    )


def progressed() -> TrainState:
    row = {"epoch": 1, "lr": 0.05, "train_loss": 1.0, "train_top1": 40.0, "val_loss": 1.1, "val_top1": 33.3,
           "val_top5": 100.0, "ema_loss": None, "ema_top1": None, "ema_top5": None}  # fmt: skip
    return TrainState(epoch=1, step_in_epoch=2, global_step=5, metrics=[row], best_top1=33.3, best_epoch=1,
                      best_source="ema", train_time=1.5, train_images=40, partial=[1.0, 2.0, 3.0, 4.0])  # fmt: skip


def test_train_state_round_trip(tmp_path: Path) -> None:
    cfg = resolve(TrainConfig(data=str(tmp_path), batch_size=8, img_size=16))
    state = progressed()
    path = state.save(tmp_path / "last.pt", **parts(cfg))
    saved = ckpt.load(path)
    assert (saved["format"], saved["version"]) == ("micronet-torch-train", CHECKPOINT_VERSION)
    assert ckpt.is_training_checkpoint(saved) and saved["class_names"] == ["a", "b", "c"]
    back = TrainState.from_checkpoint(saved, steps_per_epoch=3)
    assert {k: getattr(back, k) for k in PROGRESS} == {k: getattr(state, k) for k in PROGRESS}
    assert back.world_size == 1 and torch.equal(back.rng["torch"], saved["rng"]["torch"])
    assert TrainConfig.from_dict(saved["config"]) == cfg


def test_checkpoint_without_version_is_version_one_and_fills_defaults() -> None:
    old = {"epoch": 2, "metrics": [], "best_top1": 50.0}  # an early checkpoint: no version, no step counters
    assert checkpoint_version(old) == 1
    state = TrainState.from_checkpoint(old, steps_per_epoch=3)
    assert (state.epoch, state.step_in_epoch, state.global_step) == (2, 0, 6)
    assert (state.best_top1, state.best_source, state.partial, state.rng) == (50.0, "model", None, None)
    fresh = dataclasses.asdict(TrainState())
    assert {k: v for k, v in dataclasses.asdict(state).items() if k not in ("epoch", "global_step", "best_top1")} == {
        k: v for k, v in fresh.items() if k not in ("epoch", "global_step", "best_top1")
    }


def test_old_checkpoint_resumable_newer_one_refused(trained: Path, tmp_path: Path) -> None:
    state = ckpt.load(trained / "last.pt")
    del state["version"]
    old = tmp_path / "old.pt"
    ckpt.save_atomic(state, old)
    assert read_resumable(old)["epoch"] == 2
    state["version"] = CHECKPOINT_VERSION + 1
    newer = tmp_path / "newer.pt"
    ckpt.save_atomic(state, newer)
    with pytest.raises(TrainingError, match=f"checkpoint version {CHECKPOINT_VERSION + 1}"):
        read_resumable(newer)


def test_run_log_summary_keys(tmp_path: Path) -> None:
    cfg = resolve(TrainConfig(data=str(tmp_path), batch_size=8, img_size=16, epochs=3))
    log = RunLog(tmp_path, enabled=True)
    summary = log.summary("running", cfg, progressed(), ["a", "b", "c"], 1, "cpu")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert tuple(written) == SUMMARY_KEYS and written == summary
    assert "train_time_s" not in written and written["train_seconds"] == 1.5
    assert written["train_images_per_second"] == pytest.approx(40 / 1.5)
    assert (written["epochs_completed"], written["best_source"], written["final_top1"]) == (1, "ema", 33.3)


def test_run_log_records_epochs_on_rank_zero_only(tmp_path: Path) -> None:
    cfg = resolve(TrainConfig(data=str(tmp_path), batch_size=8, img_size=16))
    state = progressed()
    train = {"loss": 1.0, "top1": 40.0, "images_per_second": 10.0}
    val = {"loss": 1.1, "top1": 33.3, "top5": 100.0}
    other = RunLog(tmp_path / "rank1", enabled=False)
    other.open()
    other.epoch(state.metrics, train, val, None)
    assert other.summary("running", cfg, state, ["a"], 2, "cpu") == {} and not (tmp_path / "rank1").exists()
    log = RunLog(tmp_path, enabled=True)
    log.open()
    log.epoch(state.metrics, train, val, None)
    log.close()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[1] == "1,0.050000,1.000000,40.000000,1.100000,33.300000,100.000000,,,"
    assert (tmp_path / "curves.png").stat().st_size > 0 and any((tmp_path / "tensorboard").iterdir())


def test_old_summary_duration_is_read_as_train_seconds(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"status": "completed", "train_time_s": 12.5}))
    assert read_summary(path)["train_seconds"] == 12.5
