"""What a resumed run takes from its checkpoint and from the flags typed now, and how write failures end a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from micronet_torch.cli import main
from micronet_torch.cli.main import build_parser
from micronet_torch.cli.train import config_from_args, given_settings
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
