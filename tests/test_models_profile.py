"""MAdds by the paper's rule: totals, the per-part figures of paper_facts.md, the CLI's JSON."""

import json

import pytest
import timm

import micronet_torch
from micronet_torch import create_model
from micronet_torch.cli import main as cli_main

PAPER = {"micronet_m0": 4.05, "micronet_m1": 6.12, "micronet_m2": 12.74, "micronet_m3": 20.81}
PARTS = {
    "micronet_m0": [0.602, 0.552, 0.346, 0.178, 0.395, 0.400, 0.480, 0.216, 0.886],
    "micronet_m1": [0.903, 0.803, 0.377, 0.235, 0.589, 0.610, 0.745, 0.344, 1.513],
    "micronet_m2": [1.204, 0.979, 0.554, 0.768, 1.707, 1.165, 1.179, 1.591, 1.299, 0.487, 1.810],
    "micronet_m3": [1.355, 2.109, 0.805, 1.097, 1.228, 0.990, 0.990, 2.455, 3.087, 1.559, 1.428, 1.287, 0.508, 1.909],
}


@pytest.mark.parametrize("name", list(PAPER))
def test_madds_and_parts_match_the_paper(name):
    prof = micronet_torch.profile(create_model(name), img_size=224)
    assert abs(prof.madds / 1e6 - PAPER[name]) <= 0.005 * PAPER[name]
    parts = list(prof.parts.values())
    assert next(iter(prof.parts)) == "stem" and list(prof.parts)[-1] == "head"
    assert [round(p / 1e6, 3) for p in parts] == pytest.approx(PARTS[name], abs=0.0015)
    assert sum(layer.madds for layer in prof.layers) == prof.madds


def test_madds_scale_with_resolution_and_count_dsm():
    model = create_model("micronet_m0")
    small = micronet_torch.profile(model, img_size=112)
    dsm = [layer for layer in small.layers if layer.type == "DynamicShiftMax"]
    assert len(dsm) == 15
    # a K=2 activation on C x H x W costs 4 multiplies per element, a K=1 one 2
    modules = dict(model.named_modules())
    for layer in dsm:
        c, h, w = layer.output_shape
        assert layer.madds == 2 * modules[layer.name].k * c * h * w
    assert {modules[layer.name].k for layer in dsm} == {1, 2}
    assert small.madds < micronet_torch.profile(model, img_size=224).madds


def test_profile_works_on_other_networks():
    prof = micronet_torch.profile(timm.create_model("mobilenetv3_small_050"), img_size=224)
    assert 20e6 < prof.madds < 30e6  # ~24 M, the figure MobileNetV3 reports


def test_profile_cli_json(capsys):
    assert cli_main(["profile", "micronet_m3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "micronet_m3" and isinstance(out["params"], int) and isinstance(out["madds"], int)
    assert out["params"] == 2_622_960 and abs(out["madds"] - 20.81e6) < 0.005 * 20.81e6
    assert out["layers"] and {"name", "type", "madds", "params", "output_shape"} <= set(out["layers"][0])


def test_profile_cli_table_and_models(capsys):
    assert cli_main(["profile", "micronet_m0", "--img-size", "224"]) == 0
    text = capsys.readouterr().out
    assert "MAdds: 4,054,128 (4.05 M)" in text and "features.7.layers.1" in text and "counted:" in text
    assert cli_main(["models"]) == 0
    text = capsys.readouterr().out
    assert "micronet_v1_m1" in text and "published MicroNet-M2" in text
    assert cli_main(["profile", "micronet_x"]) == 2
    assert "unknown model 'micronet_x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse refuses the value before any work
        cli_main(["profile", "micronet_m0", "--img-size", "0"])
    assert stop.value.code == 2
    assert "argument --img-size: got 0; use a whole number of 1 or more" in capsys.readouterr().err
