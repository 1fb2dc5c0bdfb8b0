"""Every numeric flag refuses a value that cannot work with one line naming the flag, before any work starts,
and a training setting out of range (from a flag or a file) is refused by ``validate``; native converters' logs
are captured below Python (``runtime.native_log``); a file given as a run folder is named as one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from micronet_torch.cli import main
from micronet_torch.runtime.native_log import captured
from micronet_torch.train import TrainConfig
from micronet_torch.train.config import TrainingError, resolve, validate


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--runs", "0"], "argument --runs: got 0; use a whole number of 1 or more"),
        (["bench", "--img-size", "-1"], "argument --img-size: got -1"),
        (["bench", "--max-seconds", "nan"], "argument --max-seconds: got nan; use a number above 0"),
        (["bench", "--warmup", "-1"], "argument --warmup: got -1; use a whole number of 0 or more"),
        (["bench-train", "--threads", "2", "0"], "argument --threads: got 0"),
        (["bench-train", "--steps", "x"], "argument --steps: 'x' is not a whole number of 1 or more"),
        (["demo", "--epochs", "0"], "argument --epochs: got 0"),
        (["export", "--model", "micronet_m0", "-o", "x.onnx", "--img-size", "0"], "argument --img-size: got 0"),
        (["export", "--model", "micronet_m0", "-o", "x.onnx", "--num-classes", "0"], "argument --num-classes"),
        (["predict", "-c", "x.onnx", "--topk", "-3", "a.png"], "argument --topk/-k: got -3"),
        (["eval", "-c", "x.pt", "--batch-size", "0"], "argument --batch-size/-b: got 0"),
        (["train", "--threads", "0"], "argument --threads: got 0"),
    ],
)
def test_bad_number_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("momentum", 1.5, "--momentum 1.5: use a value in [0, 1)"),
        ("label_smoothing", -0.1, "--label-smoothing -0.1: use a value in [0, 1)"),
        ("hflip", 2.0, "--hflip 2.0: use a value in [0, 1]"),
        ("crop_pct", 0.0, "--crop-pct 0.0: use a value in [0.05, 1]"),
        ("weight_decay", float("inf"), "--weight-decay inf: use 0 or more"),
        ("workers", -1, "--workers -1: use 0 or more"),
        ("threads", 0, "--threads 0: use 1 or more"),
        ("eval_batch_size", 0, "--eval-batch-size 0: use 1 or more"),
        ("clip_grad", 0.0, "--clip-grad 0.0: the largest gradient norm must be a number above 0"),
        ("scale", (0.5, 0.2), "--scale 0.5,0.2: the crop's area fractions need 0 < low <= high <= 1"),
        ("momentum", "0.9", "--momentum '0.9': use a number"),  # a config file's string
        ("seed", True, "--seed True: use a number"),
    ],
)
def test_training_settings_out_of_range(setting: str, value: object, message: str) -> None:
    cfg = resolve(TrainConfig(model="micronet_m0", data="fashion-mnist"))
    validate(cfg, 1)  # the recipe's values pass
    setattr(cfg, setting, value)
    with pytest.raises(TrainingError) as err:
        validate(cfg, 1)
    assert str(err.value) == message


def test_native_output_is_captured_and_restored(capfd: pytest.CaptureFixture) -> None:
    with captured() as log:
        os.write(1, b"from fd 1\n")
        os.write(2, b"from fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child stderr\\n')"], check=True)
        print("python print")
    assert log.text.splitlines() == ["from fd 1", "from fd 2", "child stderr", "python print"]
    assert log.tail(2) == "child stderr | python print"
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""


def test_status_of_a_file_says_so(tmp_path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "best.pt").write_bytes(b"x")
    assert main(["status", str(tmp_path / "best.pt")]) == 2
    assert "is not a run folder (a file: give the folder that holds it)" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "gone")]) == 2
    assert "is not a run folder (it does not exist)" in capsys.readouterr().err


def test_refused_training_settings_leave_no_folder(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--momentum", "1.5", "--output", str(out)]) == 2
    assert "--momentum 1.5: use a value in [0, 1)" in capsys.readouterr().err and not out.exists()
