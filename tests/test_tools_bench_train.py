"""``micronet bench-train``: the training benchmark's table, JSON and variants, on tiny settings."""

from __future__ import annotations

import json

from micronet_torch.cli import main
from micronet_torch.models import create_model
from micronet_torch.ops import DynamicShiftMax
from micronet_torch.tools.bench_train import make_variant, replace_shift_max


def test_relu_floor_replaces_every_shift_max() -> None:
    model = create_model("micronet_m0")
    n = sum(isinstance(m, DynamicShiftMax) for m in model.modules())
    assert replace_shift_max(make_variant(model, "eager")) == n  # a copy: the model itself keeps its DSMs
    assert sum(isinstance(m, DynamicShiftMax) for m in model.modules()) == n
    floor = make_variant(model, "relu")
    assert n > 0 and not any(isinstance(m, DynamicShiftMax) for m in floor.modules())
    fused = make_variant(model, "fused")
    assert {m.impl for m in fused.modules() if isinstance(m, DynamicShiftMax)} == {"fused"}


def test_cli_table_and_json(tmp_path, capsys) -> None:
    args = ["bench-train", "--models", "micronet_m0", "mobilenetv3_small_050", "--settings", "32x4", "--steps", "1"]
    args += ["--warmup", "0", "--threads", "1", "--variants", "eager", "fused", "relu", "--out-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "| micronet_m0 | 1 | 32², batch 4 | fused |" in out
        and "| mobilenetv3_small_050 | 1 | 32², batch 4 | eager |" in out
    )
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert main(args) == 2  # a second run into the same folder would replace these rows
    assert "holds an earlier run's bench_train.json" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    variants = {(r["model"], r["variant"]) for r in rows}
    assert variants == {
        ("micronet_m0", "eager"),
        ("micronet_m0", "fused"),
        ("micronet_m0", "relu"),
        ("mobilenetv3_small_050", "eager"),  # no Dynamic Shift-Max: one row
    }
    fused = next(r for r in rows if r["variant"] == "fused")
    assert fused["images_per_s"] > 0 and fused["speed_vs_eager"] > 0 and fused["time_vs_relu"] > 0
    assert (tmp_path / "bench_train.md").read_text().startswith("CPU: ")
