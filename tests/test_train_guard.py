"""One run per folder (lock), honest resume (schedule changes), failed writes, dead runs, bad images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from micronet_torch.cli import main
from micronet_torch.train import checkpoint as ckpt
from micronet_torch.train.run_folder import LOCK_NAME, FolderBusy, Lock, check_output_dir, run_status

PYTHON = sys.executable


def tiny_args(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["train", "--data", str(data), "--img-size", "16", "--epochs", str(epochs), "--batch-size", "8",
            "--workers", "0", "--output", str(out), *extra]  # fmt: skip


def train_cmd(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return [
        PYTHON,
        "-m",
        "micronet_torch.train",
        *tiny_args(data, out, *extra, epochs=epochs)[1:],
        "--log-interval",
        "1",
    ]


def fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def write_lock(path: Path, pid: int) -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": time.time()}))


def dead_pid() -> int:
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- one run per folder -------------------------------------------------------------------------
def test_two_processes_one_folder(tmp_path: Path, tiny_folder: Path) -> None:
    """Started at once on one --output: exactly one trains; the other stops early, naming the first."""
    out = tmp_path / "same"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            train_cmd(tiny_folder, out, epochs=6), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    ended: list[tuple[int, int, str, float]] = []
    while len(ended) < 2:
        for i, p in enumerate(procs):
            if p.poll() is not None and i not in [e[0] for e in ended]:
                _, err = p.communicate()
                ended.append((i, p.returncode, err, time.monotonic()))
        time.sleep(0.05)
    codes = sorted(rc for _, rc, _, _ in ended)
    assert codes == [0, 2], ended
    loser = next(e for e in ended if e[1] == 2)
    winner = next(e for e in ended if e[1] == 0)
    assert loser[3] < winner[3]  # stopped before the training run ended
    assert f"pid {procs[winner[0]].pid}" in loser[2] and "in use by another run" in loser[2]
    assert "Traceback" not in loser[2]
    assert len(list((out / "tensorboard").glob("events.*"))) == 1
    assert not (out / LOCK_NAME).exists()  # released on exit
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_stale_lock_is_taken_over_and_live_one_refused(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    write_lock(out / LOCK_NAME, dead_pid())
    lock = check_output_dir(out, resume=False, overwrite=False)  # the dead holder's lock is stale
    assert lock.took_over and json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()
    # a live holder: nobody else may clean its temporaries
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)"])
    try:
        write_lock(out / LOCK_NAME, sleeper.pid)
        tmp = out / ".last.pt.abc.tmp"
        tmp.write_bytes(b"being written")
        with pytest.raises(FolderBusy, match=f"pid {sleeper.pid}"):
            check_output_dir(out, resume=True, overwrite=False)
        assert tmp.exists()
        assert run_status(out)["status"] == "running"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert Lock(out / LOCK_NAME, "x").acquire().took_over is not None


def test_experiment_pair_claimed_once_and_duplicates_not_counted(tmp_path: Path, monkeypatch) -> None:
    import micronet_torch.tools.experiment as exp
    from micronet_torch.tools.experiment_report import write_report

    toml = tmp_path / "grid.toml"
    runs = '[[run]]\nname = "m0"\nmodel = "micronet_m0"\n[[run]]\nname = "m1"\nmodel = "micronet_m0"\n'
    toml.write_text('results = "r.csv"\nruns_dir = "runs"\nreport = "r.md"\n' + runs)
    cfg = exp.load_config(toml)
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)"])
    try:
        (cfg.runs_dir / ".claims").mkdir(parents=True)
        write_lock(cfg.runs_dir / ".claims" / "m0-s0.lock", sleeper.pid)  # another process trains m0 seed 0

        def fake_train(cfg_, spec, seed):
            return dict(name=spec.name, study="budget", seed=seed, top1=50.0, train_seconds=0.0, madds=1, params=1)

        monkeypatch.setattr(exp, "train_one", fake_train)
        assert exp.run_experiments(cfg) == [("m1", 0)]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (cfg.runs_dir / ".claims" / "m1-s0.lock").exists()
    exp.append_result(
        cfg.results, dict(name="m1", study="budget", seed=0, top1=90.0, train_seconds=0, madds=1, params=1)
    )
    rows = list(csv.DictReader(cfg.results.open()))
    assert len(rows) == 2 and len(exp.unique_results(rows)) == 1
    assert "n=1" in write_report(cfg).read_text()  # the duplicate row is no second seed


# ---- resume with a longer schedule ---------------------------------------------------------------
def test_resume_extends_schedule_or_refuses(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    assert main(tiny_args(tiny_folder, out, epochs=2)) == 0
    capsys.readouterr()
    err = fail(capsys, [*tiny_args(tiny_folder, out, epochs=2), "--resume", "--epochs", "1"])
    assert "would train nothing" in err and "--pretrained" in err
    err = fail(capsys, [*tiny_args(tiny_folder, out, epochs=2), "--resume", "--lr", "0.5"])
    assert "--lr 0.5" in err and "--pretrained" in err
    before = ckpt.load(out / "last.pt")["model"]
    assert main([*tiny_args(tiny_folder, out, epochs=3), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "re-stretched over 3 epochs" in text
    assert float(text.split("(lr now ")[1].split(")")[0]) > 1e-5  # not the finished schedule's lr of 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    after = ckpt.load(out / "last.pt")["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


# ---- failed writes, dead runs --------------------------------------------------------------------
def test_write_failure_is_one_line_and_marks_failed(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    out = tmp_path / "o"
    (out / "curves.png").mkdir(parents=True)  # a path turned into a folder
    err = fail(capsys, tiny_args(tiny_folder, out, epochs=2))
    assert "curves.png" in err and len(err.strip().splitlines()) == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert ckpt.load(out / "last.pt")["epoch"] == 1  # the last good checkpoint is kept
    assert not (out / LOCK_NAME).exists()


def test_killed_run_reads_interrupted_and_resumes(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen(
        train_cmd(tiny_folder, out, epochs=30), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (out / "summary.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert main(["status", str(out)]) == 0
    assert ": running" in capsys.readouterr().out
    proc.kill()
    proc.wait()
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # what kill -9 leaves
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert ": interrupted" in text and "--resume" in text
    done = ckpt.load(out / "last.pt")["epoch"]
    assert main([*tiny_args(tiny_folder, out, epochs=30), "--resume", "--epochs", str(done + 1)]) == 0
    text = capsys.readouterr().out
    assert "is gone" in text and f"resumed from epoch {done}" in text
    assert run_status(out)["status"] == "completed"


# ---- bad images with workers, named once -------------------------------------------------
def test_corrupt_image_with_workers_is_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    data = tmp_path / "d"
    shutil.copytree(tiny_folder, data)
    (data / "train" / "cross" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = [*tiny_args(data, tmp_path / "o1", epochs=1), "--cache", "none"]
    args[args.index("--workers") + 1] = "1"
    err = fail(capsys, args)
    assert "bad.png" in err and "DataLoader worker" not in err and "Original Traceback" not in err
    assert main([*tiny_args(data, tmp_path / "o2", epochs=2), "--cache", "none", "--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable" in err and "bad.png" in err


# ---- fine-tuning says what it loaded --------------------------------------------------------------
def test_fine_tune_logs_loaded_weights_and_new_head(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    from conftest import make_folder

    src = tmp_path / "src"
    assert main(tiny_args(tiny_folder, src, epochs=1)) == 0
    data = make_folder(tmp_path / "two", classes=("circle", "cross"))
    capsys.readouterr()
    assert main(tiny_args(data, tmp_path / "ft", "--pretrained", str(src / "best.pt"), epochs=1)) == 0
    out = capsys.readouterr().out
    assert "fine-tuning from" in out and "loaded" in out and "head was replaced (3 -> 2 classes)" in out
