"""The experiment runner: a tiny grid trains, appends one row per (run, seed), skips finished pairs, reports."""

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import micronet_torch
from micronet_torch.cli import main as cli_main
from micronet_torch.models import build_model
from micronet_torch.tools.experiment import append_result, load_config, run_experiments
from micronet_torch.tools.experiment_report import write_report

ROOT = Path(__file__).resolve().parents[1]


def _image_folder(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, cls in enumerate(("circle", "square")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = np.full((32, 32), 40 * label, np.uint8) + rng.integers(0, 30, (32, 32), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture
def tiny_config(tmp_path):
    data = _image_folder(tmp_path / "data")
    cfg = tmp_path / "grid.toml"
    cfg.write_text(
        f"""
title = "tiny"
results = "out/results.csv"
runs_dir = "out/runs"
report = "out/results.md"
figure = "out/figure"
ablation_baseline = "m0"
[defaults]
data = "{data.as_posix()}"
img_size = 32
epochs = 1
batch_size = 8
workers = 0
seeds = [0]
[[run]]
name = "m0"
model = "micronet_m0"
budget = "M0"
[[run]]
name = "mnv3"
model = "mobilenetv3_small_w0.22"
budget = "M0"
[[run]]
name = "m0_relu"
model = "micronet_m0"
study = "ablation"
variant = {{ activation = "relu" }}
"""
    )
    return cfg


def test_grid_runs_once_and_reports(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    assert [r.name for r in cfg.runs] == ["m0", "mnv3", "m0_relu"]
    assert run_experiments(cfg) == [("m0", 0), ("mnv3", 0), ("m0_relu", 0)]
    rows = list(csv.DictReader(cfg.results.open()))
    assert [r["name"] for r in rows] == ["m0", "mnv3", "m0_relu"]
    for row in rows:
        assert 0 <= float(row["top1"]) <= 100 and int(row["madds"]) > 0 and int(row["params"]) > 0
        assert row["command"].endswith(f"--only {row['name']} --seeds 0")
    m0 = micronet_torch.profile(build_model("micronet_m0", num_classes=2), img_size=32)
    assert int(rows[0]["madds"]) == m0.madds and int(rows[0]["params"]) == m0.params
    assert run_experiments(cfg) == []  # finished pairs are skipped
    report = write_report(cfg).read_text()
    assert "## MicroNet against MobileNetV3-Small at matched MAdds" in report and "## Ablations" in report
    assert "`micronet_m0`" in report and "m0_relu" in report
    assert (tmp_path / "out/figure.png").stat().st_size > 0 and (tmp_path / "out/figure.svg").is_file()


def test_pairs_finished_by_another_process_are_skipped(tiny_config, monkeypatch):
    """Two processes on one grid: a pair that appears in the CSV while this one works is not trained again."""
    import micronet_torch.tools.experiment as exp

    cfg = load_config(tiny_config)
    trained = []

    def fake_train(cfg_, spec, seed):
        trained.append(spec.name)
        if spec.name == "m0":  # meanwhile, another process finishes "mnv3"
            append_result(cfg_.results, dict(name="mnv3", study="budget", seed=0, top1=1.0, madds=1, params=1))
        return dict(name=spec.name, study=spec.study, seed=seed, top1=1.0, train_seconds=0.0, madds=1, params=1)

    monkeypatch.setattr(exp, "train_one", fake_train)
    assert run_experiments(cfg) == [("m0", 0), ("m0_relu", 0)]
    assert trained == ["m0", "m0_relu"]


def test_report_longer_recipes_and_target(tmp_path):
    """A 'best' study gets its own table with the run's note; the best MicroNet is compared with the target."""
    cfg_file = tmp_path / "grid.toml"
    cfg_file.write_text(
        """
title = "t"
results = "results.csv"
report = "results.md"
figure = "figure"
target_top1 = 95.0
target_label = "MobileNet (benchmark)"
[[run]]
name = "m0"
model = "micronet_m0"
budget = "M0"
[[run]]
name = "m0_long"
model = "micronet_m0"
study = "best"
note = "40 epochs, random erasing 0.25"
epochs = 40
reprob = 0.25
"""
    )
    cfg = load_config(cfg_file)
    assert cfg.runs[1].note == "40 epochs, random erasing 0.25" and "note" not in cfg.runs[1].train
    assert cfg.runs[1].train["reprob"] == 0.25
    common = dict(budget="", model="micronet_m0", variant="", img_size=32, seed=0, madds=419184, params=383020)
    for name, study, epochs, top1 in (("m0", "budget", 10, 89.0), ("m0_long", "best", 40, 91.25)):
        append_result(
            cfg.results,
            dict(common, name=name, study=study, epochs=epochs, top1=top1, train_seconds=1.0, hardware="cpu"),
        )
    report = write_report(cfg).read_text()
    assert "## Longer recipes" in report and "| m0_long | `micronet_m0` | 40 epochs, random erasing 0.25 |" in report
    assert "Best MicroNet: `m0_long` at 91.25 %" in report
    assert "That is 3.75 points below the 95.0 % of MobileNet (benchmark)." in report
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_bad_configs_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nname = "a"\n')
    with pytest.raises(ValueError, match="run #1 has no 'model'"):
        load_config(bad)
    assert cli_main(["experiment", "run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_grid_pairs_match_within_ten_percent():
    """The matched-budget pairs of benchmarks/fashion_mnist.toml agree in MAdds within 10 %."""
    path = ROOT / "benchmarks" / "fashion_mnist.toml"
    raw = tomllib.loads(path.read_text())
    cfg = load_config(path)
    img = raw["defaults"]["img_size"]
    by_budget: dict[str, list[int]] = {}
    for run in cfg.runs:
        if run.study == "budget":
            model = build_model(run.model, num_classes=10, **run.variant)
            by_budget.setdefault(run.budget, []).append(micronet_torch.profile(model, img_size=img).madds)
    assert sorted(by_budget) == ["M0", "M1", "M2", "M3"]
    for budget, (a, b) in by_budget.items():
        assert abs(a / b - 1) <= 0.10, budget


def test_interrupted_grid_exits_cleanly(tiny_config, monkeypatch, capsys):
    import signal

    from micronet_torch.tools import experiment
    from micronet_torch.train import Interrupted

    def stop(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(experiment, "train_one", stop)
    assert cli_main(["experiment", "run", str(tiny_config)]) == 128 + signal.SIGTERM
    assert "run the same command to resume" in capsys.readouterr().out
    assert not load_config(tiny_config).results.exists()
