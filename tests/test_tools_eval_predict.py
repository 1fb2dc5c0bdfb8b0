"""``micronet eval`` / ``predict`` / ``demo``: exact reproduction, class names, published formats, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import micronet_torch
from micronet_torch.cli import main


def run_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_reproduces_best_top1(capsys: pytest.CaptureFixture, trained: Path, tiny_folder: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    argv = ["eval", "--model", "micronet_m0", "--checkpoint", str(trained / "best.pt"), "--data", str(tiny_folder)]
    result = run_json(capsys, [*argv, "--img-size", "20", "--json", "--workers", "0"])
    assert result["n"] == 12 and result["top1"] == pytest.approx(summary["best_top1"], abs=1e-9)
    assert {"top1", "top5", "loss", "n"} <= set(result)
    assert main(argv) == 0 and "top-1" in capsys.readouterr().out  # the plain form


def test_eval_rejects_mismatches(
    capsys: pytest.CaptureFixture, tmp_path: Path, trained: Path, tiny_folder: Path
) -> None:
    from conftest import make_folder

    best = str(trained / "best.pt")
    assert main(["eval", "--model", "micronet_m1", "--checkpoint", best, "--data", str(tiny_folder)]) == 2
    assert "use --model micronet_m0" in capsys.readouterr().err
    two = make_folder(tmp_path / "two", classes=("a", "b"))
    assert main(["eval", "--checkpoint", best, "--data", str(two)]) == 2
    assert "3 classes" in capsys.readouterr().err
    renamed = make_folder(tmp_path / "renamed", classes=("a", "b", "c"))
    assert main(["eval", "--checkpoint", best, "--data", str(renamed)]) == 2
    assert "named as in training" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really")
    assert main(["eval", "--checkpoint", str(tmp_path / "broken.pt"), "--data", str(tiny_folder)]) == 2
    assert "not readable" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tiny_folder)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_names_classes_from_checkpoint(capsys: pytest.CaptureFixture, trained: Path, tiny_folder: Path) -> None:
    images = sorted(str(p) for p in (tiny_folder / "val" / "cross").glob("*.png"))[:2]
    out = run_json(capsys, ["predict", "--checkpoint", str(trained / "best.pt"), *images, "--json"])
    assert [r["image"] for r in out] == images
    top = out[0]["top"]
    assert len(top) == 3 and {t["class"] for t in top} == {"circle", "cross", "stripes"}
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", "--checkpoint", str(trained / "best.pt"), images[0]]) == 0
    assert "%" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(trained / "best.pt"), "missing.png"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_published_format_uses_imagenet_names_and_transform(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    model = micronet_torch.create_model("micronet_m0")  # 1000 classes, random weights
    published = {"epoch": 600, "arch": "micronet_m0", "best_prec1": 46.6}
    published["state_dict"] = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(published, tmp_path / "model_best.pth.tar")
    Image.new("RGB", (300, 240), (120, 80, 40)).save(tmp_path / "photo.jpg")
    argv = ["predict", "--checkpoint", str(tmp_path / "model_best.pth.tar"), str(tmp_path / "photo.jpg")]
    out = run_json(capsys, [*argv, "--json", "--model", "micronet_m0"])
    assert len(out[0]["top"]) == 5
    from torchvision.models import ResNet18_Weights

    names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert all(t["class"] == names[t["index"]] for t in out[0]["top"])
    from micronet_torch.models import load_model as load_for_inference

    loaded = load_for_inference(tmp_path / "model_best.pth.tar")  # model found from 'arch'
    assert loaded.name == "micronet_m0" and loaded.data_config.policy == "crop"
    assert (loaded.data_config.img_size, loaded.data_config.resize_size) == (224, 256)


def test_eval_safetensors_on_folder(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_folder: Path) -> None:
    from micronet_torch.models import save_safetensors

    model = micronet_torch.create_model("micronet_m0", num_classes=3)
    save_safetensors(model, tmp_path / "m.safetensors", "micronet_m0")
    argv = ["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", str(tiny_folder), "--img-size", "32"]
    result = run_json(capsys, [*argv, "--json", "--workers", "0"])
    assert result["n"] == 12 and result["model"] == "micronet_m0"


def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture, tmp_path: Path, fake_fashion_mnist: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1", "--batch-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and f"results in {out}" in text and "samples/" in text
    assert (out / "eval.json").is_file() and len(list((out / "samples").glob("*.png"))) == 6
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["top1"] == pytest.approx(json.loads((out / "summary.json").read_text())["best_top1"])
    assert main(["demo", "--output", str(out), "--epochs", "1", "--batch-size", "32"]) == 0  # reuses the run
    assert "resumed from epoch 1" in capsys.readouterr().out
