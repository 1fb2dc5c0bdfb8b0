"""What a resumed run takes from its checkpoint and from the flags typed now, and how write failures end a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from micronet_torch.cli import main
from micronet_torch.cli.main import build_parser
from micronet_torch.cli.train import config_from_args, given_settings
from micronet_torch.data.config import MAX_IMG_SIZE
from micronet_torch.train import TrainConfig, TrainingError, resolve
from micronet_torch.train import checkpoint as ckpt
from micronet_torch.train.resume import merge_resumed


def tiny_args(data: Path, out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["train", "--data", str(data), "--img-size", "16", "--epochs", str(epochs), "--batch-size", "8",
            "--workers", "0", "--output", str(out), "--quiet", *extra]  # fmt: skip


def fail(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- --resume compares with what was typed ----------------------------------------------------------------
def merged(saved: TrainConfig, *flags: str) -> tuple[TrainConfig, list[str]]:
    args = build_parser().parse_args(["train", "--output", "o", "--resume", *flags])
    return merge_resumed(resolve(saved).to_dict(), config_from_args(args), Path("o"), given_settings(args))


def test_flag_typed_at_its_default_is_a_change() -> None:
    cfg, changed = merged(TrainConfig(data="d", mixup=0.2, seed=5, batch_size=8), "--mixup", "0", "--seed", "0")
    assert (cfg.mixup, cfg.seed) == (0.0, 0) and set(changed) == {"mixup", "seed"}
    cfg, changed = merged(TrainConfig(data="d", mixup=0.2, seed=5, batch_size=8))  # nothing typed: the run's
    assert (cfg.mixup, cfg.seed, changed) == (0.2, 5, [])
    cfg, changed = merged(TrainConfig(data="d", mixup=0.2, batch_size=8), "--mixup", "0.2")  # typed, the same
    assert (cfg.mixup, changed) == (0.2, [])


def test_refused_flag_typed_at_its_default_is_refused() -> None:
    with pytest.raises(TrainingError, match=r"--momentum 0\.9 \(the run has 0\.95\)"):
        merged(TrainConfig(data="d", momentum=0.95, batch_size=8), "--momentum", "0.9")
    with pytest.raises(TrainingError, match="is a micronet_m3 run, not micronet_m0"):
        merged(TrainConfig(model="micronet_m3", data="d", batch_size=8), "--model", "micronet_m0")
    cfg, _ = merged(TrainConfig(model="micronet_m3", data="d", batch_size=8))  # --model not typed
    assert cfg.model == "micronet_m3"


def test_resume_warns_about_a_flag_set_back_to_its_default(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    out = tmp_path / "o"
    assert main(tiny_args(tiny_folder, out, "--mixup", "0.2", "--seed", "5")) == 0
    capsys.readouterr()
    assert main([*tiny_args(tiny_folder, out, "--mixup", "0", "--seed", "0", epochs=2), "--resume"]) == 0
    assert "resuming with changed settings: mixup, seed" in capsys.readouterr().out
    config = ckpt.load(out / "last.pt")["config"]
    assert (config["mixup"], config["seed"]) == (0.0, 0)
    assert json.loads((out / "summary.json").read_text())["config"]["mixup"] == 0.0


# ---- a resumed checkpoint's saved config is checked before any work --------------------------------------
@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path) -> Path:
    """A finished 1-epoch run whose last.pt the tests copy and spoil."""
    out = tmp_path_factory.mktemp("one_epoch") / "o"
    assert main(tiny_args(tiny_folder, out)) == 0
    return out / "last.pt"


def spoiled(one_epoch: Path, tmp_path: Path, change) -> Path:
    state = ckpt.load(one_epoch)
    change(state)
    path = tmp_path / "spoiled.pt"
    ckpt.save_atomic(state, path)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["config"].update(lr="0.1"), "its saved config is not usable (--lr '0.1': use a number)"),
        (lambda s: s["config"].update(img_size=100000), f"(--img-size 100000: use at most {MAX_IMG_SIZE}"),
        (lambda s: s["config"].update(scale=5), "(--scale 5: use two numbers"),
        (lambda s: s["config"].update(amp="yes"), "(--amp 'yes': use true or false)"),
        (lambda s: s.update(config=[1, 2]), "the checkpoint's config is a list, not a dict"),
        (lambda s: s.update(epoch="1"), "the checkpoint's epoch is a str, not a int"),
        (lambda s: s.pop("scheduler"), "the checkpoint has no scheduler, so it cannot be resumed"),
        (lambda s: s.update(optimizer={"state": {}, "param_groups": []}), "optimiser or schedule state does not fit"),
        (lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(1)}), "model weights do not fit"),
    ],
)
def test_spoiled_checkpoint_is_one_line_before_any_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path, one_epoch: Path, change, message: str
) -> None:
    path = spoiled(one_epoch, tmp_path, change)
    out = tmp_path / "o"
    err = fail(capsys, [*tiny_args(tiny_folder, out, epochs=2), "--resume", str(path)])
    assert (message in err and "--pretrained" in err) or "do not fit" in err, err
    assert not (out / "last.pt").exists() and not (out / "metrics.csv").exists()  # nothing trained


def test_checkpoint_of_another_version_resumes_with_its_recipe(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path, one_epoch: Path
) -> None:
    """Settings a checkpoint does not record (written by an older version) take the recipe's values."""

    def older(state: dict) -> None:
        for key in ("ema_decay", "hflip", "pad", "warmup_lr", "min_lr", "cache", "dsm", "label_smoothing"):
            state["config"].pop(key)

    path = spoiled(one_epoch, tmp_path, older)
    out = tmp_path / "o"
    assert main([*tiny_args(tiny_folder, out, "--ema", epochs=2), "--resume", str(path)]) == 0
    config = ckpt.load(out / "last.pt")["config"]
    assert config["ema_decay"] is not None and config["label_smoothing"] == 0.0 and config["hflip"] == 0.0


# ---- write failures: one line, exit 2, summary.json says failed ------------------------------------------
def test_lock_that_is_a_folder_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    out = tmp_path / "o"
    (out / ".lock").mkdir(parents=True)
    err = fail(capsys, tiny_args(tiny_folder, out))
    assert f"{out / '.lock'} is a folder, not a lock file: remove it" in err
    assert (out / ".lock").is_dir()  # left as it was


def test_tensorboard_entry_that_is_a_file_marks_failed(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "tensorboard").write_text("not a folder")
    err = fail(capsys, tiny_args(tiny_folder, out))
    assert f"{out / 'tensorboard'}: not a folder" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "tensorboard" in summary["error"]
    assert not (out / ".lock").exists()


@pytest.mark.subprocess
def test_file_size_limit_during_checkpoint_write_marks_failed(tmp_path: Path, tiny_folder: Path) -> None:
    """A full disk seen as the kernel reports it: EFBIG past RLIMIT_FSIZE (SIGXFSZ ignored), in a child process."""
    out = tmp_path / "o"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"  # the metrics fit, a checkpoint does not
        "from micronet_torch.cli import main\n"
        f"sys.exit(main({tiny_args(tiny_folder, out, '--dsm', 'eager')!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "unexpected pos" not in err, err
    assert "cannot write the run's files" in err and "best.pt" in err and "File too large" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["error"]
    assert not (out / "best.pt").exists() and not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
