"""Text from files printed escaped, grid run names kept inside runs_dir, and odd files read as one line each."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from micronet_torch._text import one_line, printable
from micronet_torch.cli import main
from micronet_torch.tools.experiment import load_config, run_experiments
from micronet_torch.train import checkpoint as ckpt

ESC = "\x1b]0;owned\x07\x1b[2J\r\nfake line\u202e"  # OSC title, CSI clear screen, a fake line, a bidi override


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- terminal-safe text ----------------------------------------------------------------------------------
def test_printable_escapes_and_cuts() -> None:
    assert printable("T-shirt/top") == "T-shirt/top"
    assert printable(ESC) == "\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake line\\u202e"
    assert printable("\x9b31m") == "\\x9b31m"  # the 8-bit CSI
    assert printable("x" * 10_000_000, 50) == "x" * 50 + "... (9,999,950 more characters)"
    assert one_line("a\n  b\x1b[31m", 100) == "a b\\x1b[31m"
    assert one_line("y" * 20, 10) == "yyyyyyy..."


def test_status_prints_a_summary_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    summary = {"status": "failed", "error": ESC + "e" * 5000, "epochs_completed": ESC, "epochs": 3}
    (run / "summary.json").write_text(json.dumps(summary))
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out and len(out) < 1000
    assert ": failed, \\x1b]0;owned" in out and "\\r\\nfake..." in out and len(out.splitlines()) == 2


def test_status_of_a_summary_that_is_a_list(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "summary.json").write_text("[1, 2]")
    err = one_error_line(capsys, ["status", str(tmp_path)])
    assert "summary.json holds a JSON list, not a run summary" in err


def test_error_messages_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = one_error_line(capsys, ["status", str(tmp_path / f"gone{ESC}")])
    assert "\x1b" not in err and "gone\\x1b]0;owned" in err


def test_predict_prints_class_and_file_names_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture, trained: Path, tiny_folder: Path
) -> None:
    state = ckpt.load(trained / "best.pt")
    state["class_names"] = [ESC, "b" * 100_000, "c"]
    evil = tmp_path / "evil.pt"
    ckpt.save_atomic(state, evil)
    image = tmp_path / f"img{ESC.replace('/', '_')}.png"
    shutil.copy(next((tiny_folder / "val").rglob("*.png")), image)
    code = main(["predict", "-c", str(evil), str(image), str(tmp_path / f"missing{ESC}.png"), "-k", "3"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "\x1b" not in out + err and "\u202e" not in out + err and len(out) < 2000
    assert "\\x1b]0;owned" in out and "b" * 200 + "... (99,800 more characters)" in out
    assert "missing\\x1b]0;owned" in err


# ---- experiment grids ------------------------------------------------------------------------------------
def grid(tmp_path: Path, name: str, extra: str = "") -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(
        f'runs_dir = "runs"\nresults = "r.csv"\n[defaults]\nepochs = 1\n{extra}[[run]]\nname = {json.dumps(name)}\n'
        'model = "micronet_m0"\n'
    )
    return path


@pytest.mark.parametrize("name", ["../../escaped_run", "/tmp/abs_run", "a/b", "a\\\\b", "..", ".claims", "", "x\n"])
def test_grid_run_names_stay_inside_runs_dir(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    path = grid(tmp_path, name)
    with pytest.raises(ValueError, match="is not a plain name"):
        load_config(path)
    err = one_error_line(capsys, ["experiment", "run", str(path)])
    assert "is not a plain name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml"]  # nothing written, inside or out


def test_grid_seeds_and_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"seeds \['\.\./x'\] must be a list of whole numbers"):
        load_config(grid(tmp_path, "ok", 'seeds = ["../x"]\n'))
    with pytest.raises(ValueError, match="'output' is not a training setting the grid may set"):
        load_config(grid(tmp_path, "ok", 'output = "/elsewhere"\n'))
    with pytest.raises(ValueError, match="'epoch' is not a training setting"):
        load_config(grid(tmp_path, "ok", "epoch = 3\n"))
    assert run_experiments(load_config(grid(tmp_path, "m0_ok.1")), dry_run=True) == [("m0_ok.1", 0)]


def test_report_of_a_csv_missing_a_column(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = grid(tmp_path, "m0")
    (tmp_path / "r.csv").write_text("name,seed,top1\nm0,0,90.0\n")
    err = one_error_line(capsys, ["experiment", "report", str(path)])
    assert "r.csv: the results CSV has no study, budget, model" in err
    (tmp_path / "r.csv").write_text("seed,top1\n0,90.0\n")
    err = one_error_line(capsys, ["experiment", "run", str(path)])
    assert "the results CSV has no name column" in err


# ---- built-in data ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda raw: (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7),
            "is not readable",
        ),
        (lambda raw: (raw / "t10k-labels-idx1-ubyte").write_bytes(b"junk" * 3), "is not readable"),
        (lambda raw: (raw / "train-labels-idx1-ubyte").write_bytes(b""), "is not readable"),
    ],
)
def test_corrupt_fashion_mnist_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, fake_fashion_mnist: Path, spoil, message: str
) -> None:
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in fake_fashion_mnist.glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    spoil(raw)
    out = tmp_path / "o"
    err = one_error_line(capsys, ["train", "--data-root", str(root), "--epochs", "1", "--output", str(out), "-q"])
    assert f"Fashion-MNIST in {raw} {message}" in err


def test_corrupt_fashion_mnist_gz_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, fake_fashion_mnist: Path):
    (fake_fashion_mnist / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 20)
    err = one_error_line(capsys, ["train", "--epochs", "1", "--output", str(tmp_path / "o"), "-q"])
    assert "cannot unpack Fashion-MNIST from" in err
