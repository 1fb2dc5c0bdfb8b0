"""``micronet train``: what a run leaves behind, recipes, bad input, exact resume, signals, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from micronet_torch import train as engine
from micronet_torch.cli import main
from micronet_torch.train import checkpoint as ckpt

PYTHON = sys.executable


def tiny_args(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--img-size",
        "16",
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--output",
        str(out),
        *extra,
    ]


def fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the CLI expecting a clean user error: exit 2, one 'micronet train: error:' line, no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(tiny_args(tiny_folder, out, "--ema")) == 0
    return out


def test_run_leaves_its_files(finished_run: Path) -> None:
    out = finished_run
    for name in ("last.pt", "best.pt", "summary.json", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("model", "epochs_completed", "best_top1", "final_top1", "final_top5", "train_images_per_second"):
        assert summary[key] is not None, key
    assert summary["epochs_completed"] == 2 and summary["status"] == "completed"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 3
    best = ckpt.load(out / "best.pt")
    assert ckpt.is_training_checkpoint(best)
    assert best["model_name"] == "micronet_m0" and best["num_classes"] == 3 and best["in_chans"] == 3
    assert best["class_names"] == ["circle", "cross", "stripes"] and best["img_size"] == 16
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best["model"])
    for key in ("optimizer", "scheduler", "ema", "epoch", "config", "metrics"):
        assert key in best, key
    assert best["model_source"] in ("model", "ema")


def test_checkpoint_loads_through_create_model(finished_run: Path) -> None:
    import micronet_torch

    model = micronet_torch.create_model("micronet_m0", pretrained=str(finished_run / "best.pt"), num_classes=3)
    sd = ckpt.load(finished_run / "best.pt")["model"]
    torch.testing.assert_close(model.state_dict()["classifier.2.linear.0.weight"], sd["classifier.2.linear.0.weight"])


def test_fine_tune_replaces_head(tmp_path: Path, finished_run: Path) -> None:
    from conftest import make_folder

    data = make_folder(tmp_path / "two", classes=("circle", "cross"))
    out = tmp_path / "ft"
    args = tiny_args(data, out, "--pretrained", str(finished_run / "best.pt"), epochs=1)
    assert main(args) == 0
    assert ckpt.load(out / "best.pt")["num_classes"] == 2


def test_paper_recipe_is_the_published_one() -> None:
    cfg = engine.resolve(engine.TrainConfig(model="micronet_m3", recipe="paper"))
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.opt, cfg.momentum) == (600, 512, 0.2, "momentum", 0.9)
    assert (cfg.weight_decay, cfg.wd_all, cfg.warmup_epochs, cfg.label_smoothing) == (4e-5, True, 5.0, 0.0)
    assert cfg.drop_rate == 0.1 and cfg.img_size == 224 and cfg.scale == (0.08, 1.0) and cfg.hflip == 0.5
    m0 = engine.resolve(engine.TrainConfig(model="micronet_m0", recipe="paper", batch_size=128))
    assert m0.lr == 0.05 and m0.weight_decay == 3e-5 and m0.warmup_epochs == 0 and m0.drop_rate == 0.05
    dcfg = engine.data_config(cfg)
    assert dcfg.policy == "crop" and dcfg.resize_size == 256 and dcfg.img_size == 224
    from timm.optim import create_optimizer_v2

    import micronet_torch

    opt = create_optimizer_v2(
        micronet_torch.create_model("micronet_m0"), opt="momentum", lr=0.1, weight_decay=3e-5, filter_bias_and_bn=False
    )
    assert all(g["weight_decay"] == 3e-5 for g in opt.param_groups)  # on all parameters


def test_small_folder_defaults() -> None:
    cfg = engine.resolve(engine.TrainConfig(data="/some/folder", batch_size=64))
    assert cfg.hflip == 0.0 and cfg.pad == 2 and cfg.opt == "adamw" and cfg.label_smoothing == 0.0
    assert engine.resolve(engine.TrainConfig()).hflip == 0.5  # Fashion-MNIST


def test_random_erasing_is_applied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: Path) -> None:
    """--reprob 1: every training batch goes through timm's RandomErasing and comes out changed."""
    from timm.data.random_erasing import RandomErasing

    changed: list[bool] = []
    original = RandomErasing.__call__

    def spy(self: RandomErasing, x: torch.Tensor) -> torch.Tensor:
        before = x.clone()
        out = original(self, x)
        changed.append(bool((out != before).any()))
        return out

    monkeypatch.setattr(RandomErasing, "__call__", spy)
    assert main(tiny_args(tiny_folder, tmp_path / "o", "--reprob", "1.0", epochs=1)) == 0
    assert changed and all(changed)


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_inputs(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    assert "does not exist" in fail(capsys, tiny_args(tmp_path / "nope", out))
    (tmp_path / "empty").mkdir()
    assert "no train/ or val/" in fail(capsys, tiny_args(tmp_path / "empty", out))
    assert "BatchNorm1d" in fail(capsys, [*tiny_args(tiny_folder, out), "--batch-size", "1"])
    assert "unknown model" in fail(capsys, [*tiny_args(tiny_folder, out), "--model", "micronet_m9"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not writable" in fail(capsys, tiny_args(tiny_folder, blocker / "out"))
    assert "no checkpoint" in fail(capsys, [*tiny_args(tiny_folder, tmp_path / "fresh"), "--resume"])
    assert "random erasing" in fail(capsys, [*tiny_args(tiny_folder, out), "--reprob", "1.5"])
    assert not out.exists() or not (out / "last.pt").exists()


def test_corrupt_image_fails_or_is_skipped(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "cross" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = fail(capsys, tiny_args(data, tmp_path / "o1", epochs=1))
    assert "bad.png" in err and "--skip-bad-images" in err
    assert main([*tiny_args(data, tmp_path / "o2", epochs=1), "--skip-bad-images"]) == 0
    assert "skipped 1 unreadable" in capsys.readouterr().err


def test_odd_images_are_converted(tmp_path: Path, tiny_folder: Path) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_folder, data)
    import numpy as np

    Image.new("RGBA", (30, 12), (255, 0, 0, 128)).save(data / "train" / "circle" / "rgba.png")
    Image.new("P", (9, 9)).save(data / "train" / "cross" / "palette.png")
    Image.fromarray(np.full((5, 5), 40000, np.uint16)).save(data / "val" / "stripes" / "deep.png")  # < crop
    out = tmp_path / "o"
    assert main([*tiny_args(data, out, epochs=1), "--cache", "none"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 1


def test_existing_run_needs_resume_or_overwrite(
    capsys: pytest.CaptureFixture, finished_run: Path, tiny_folder: Path
) -> None:
    assert "--resume" in fail(capsys, tiny_args(tiny_folder, finished_run))
    err = fail(capsys, [*tiny_args(tiny_folder, finished_run), "--resume", "--model", "micronet_m1"])
    assert "micronet_m0 run" in err


def test_nan_loss_stops_with_step_and_lr(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: Path
) -> None:
    calls = {"n": 0}

    class NaNAfterEpoch(torch.nn.CrossEntropyLoss):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            loss = super().forward(logits, target)
            return loss * float("nan") if calls["n"] > 4 else loss  # 3 steps per epoch: dies in epoch 2

    monkeypatch.setattr("micronet_torch.train.trainer.build_loss", lambda cfg: NaNAfterEpoch())
    out = tmp_path / "o"
    err = fail(capsys, tiny_args(tiny_folder, out, epochs=3))
    assert "nan" in err and "epoch 2, step 2" in err and "lr" in err and "last.pt" in err
    state = ckpt.load(out / "last.pt")
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
    )
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


# ---- resume --------------------------------------------------------------------------------------------
class StopAfter(Exception):
    pass


def test_resume_is_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_folder: Path) -> None:
    if os.environ.get("MICRONET_TEST_FRESH_PROCESS") != "1":
        # in a fresh interpreter: after the full suite has loaded every runtime's native libraries into this one,
        # an in-process EMA run of this test crashed it (a segfault seen only in the full suite, never alone)
        env = {**os.environ, "MICRONET_TEST_FRESH_PROCESS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::test_resume_is_exact"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        return
    full = tmp_path / "full"
    assert main(tiny_args(tiny_folder, full, "--ema", epochs=3)) == 0

    # (a) killed at an epoch boundary: after epoch 1's checkpoint
    cut = tmp_path / "cut"
    original = engine.Trainer._end_epoch

    def end_then_die(self: engine.Trainer, epoch: int, train_m: dict) -> None:
        original(self, epoch, train_m)
        if epoch == 0:
            raise StopAfter

    monkeypatch.setattr(engine.Trainer, "_end_epoch", end_then_die)
    with pytest.raises(StopAfter):
        main(tiny_args(tiny_folder, cut, "--ema", epochs=3))
    monkeypatch.setattr(engine.Trainer, "_end_epoch", original)
    assert main([*tiny_args(tiny_folder, cut, "--ema", epochs=3), "--resume"]) == 0
    assert (cut / "metrics.csv").read_text() == (full / "metrics.csv").read_text()

    # (b) SIGINT in the middle of epoch 2: saved mid-epoch, resumed from that step. The signal goes to a fresh
    # process of its own: the test process has loaded every runtime's native libraries by now, and one of them
    # does not survive a SIGINT delivered to it (a segfault after the full suite, never alone)
    mid = tmp_path / "mid"
    code = (
        "import os, signal, sys\n"
        "from micronet_torch import train as engine\n"
        "from micronet_torch.cli import main\n"
        "original = engine.Progress.update\n"
        "def update_and_signal(self, step, **info):\n"
        "    original(self, step, **info)\n"
        "    if self.desc.startswith('epoch 2/') and step == 1:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "engine.Progress.update = update_and_signal\n"
        f"sys.exit(main({tiny_args(tiny_folder, mid, '--ema', epochs=3)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    state = ckpt.load(mid / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    assert json.loads((mid / "summary.json").read_text())["status"] == "interrupted"
    assert main([*tiny_args(tiny_folder, mid, "--ema", epochs=3), "--resume"]) == 0
    assert (mid / "metrics.csv").read_text() == (full / "metrics.csv").read_text()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _train_cmd(data: Path, out: Path, epochs: int) -> list[str]:
    return [PYTHON, "-m", "micronet_torch.train", *tiny_args(data, out, epochs=epochs)[1:], "--log-interval", "1"]


def test_sigkill_then_resume(tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        _train_cmd(tiny_folder, out, 8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(out / "last.pt", proc)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    (out / ".metrics.csv.killed.tmp").write_bytes(b"half a write")  # as if killed inside an atomic write
    done = ckpt.load(out / "last.pt")["epoch"]  # the file is whole: written atomically
    assert done >= 1
    resumed = subprocess.run(
        [*_train_cmd(tiny_folder, out, 8), "--resume"], capture_output=True, text=True, timeout=300, check=True
    )
    assert f"resumed from epoch {done} step 0" in resumed.stdout
    assert f"epoch {done}/8 " not in resumed.stdout  # the finished epoch is not repeated
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 8 and summary["status"] == "completed"
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [str(i) for i in range(1, 9)]
    assert not list(out.glob(".*.tmp"))


def test_sigterm_saves_and_exits(tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        _train_cmd(tiny_folder, out, 50), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    _wait_for(out / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    ckpt.load(out / "last.pt")


# ---- many processes ------------------------------------------------------------------------------------
def test_torchrun_two_processes_on_cpu(tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "micronet_torch.train",
        *tiny_args(tiny_folder, out, "--sync-bn", "--threads", "1")[1:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2
    assert run.stdout.count("done: 2 epochs") == 1  # rank 0 alone reports and writes
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert len(list((out / "tensorboard").glob("events.*"))) == 1
    assert summary["final_top1"] is not None and ckpt.load(out / "best.pt")["world_size"] == 2
