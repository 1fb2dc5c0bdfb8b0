"""``micronet bench``: records, JSON/Markdown output and the round-robin timer, at tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from micronet_torch.cli import main
from micronet_torch.tools.bench import run_benchmark, settings_for, time_round_robin
from micronet_torch.tools.bench_report import Record, markdown, targets


def test_round_robin_counts() -> None:
    calls = []
    times = time_round_robin({("a", "x"): lambda: calls.append("a"), ("b", "x"): lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]
    assert all(len(v) == 3 for v in times.values())


def test_round_robin_blocks() -> None:
    """Turns of 3 calls: the first of each turn is untimed, so 4 timed runs take 2 turns per job."""
    calls = []
    times = time_round_robin(
        {("a", "x"): lambda: calls.append("a"), ("b", "x"): lambda: calls.append("b")}, 4, 0, block=3
    )
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert all(len(v) == 4 for v in times.values())


def test_round_robin_rejects_bad_block() -> None:
    with pytest.raises(ValueError, match="block"):
        time_round_robin({("a", "x"): lambda: None}, 1, 0, block=0)


def test_round_robin_time_cap() -> None:
    times = time_round_robin({("a", "x"): lambda: None}, 1000, 0, max_seconds=0.0)
    assert len(times[("a", "x")]) == 3  # at least three rounds, then the cap stops it


def test_settings() -> None:
    assert settings_for(1, 32) == [(1, 1), (1, 32)]
    assert settings_for(4, 32) == [(1, 1), (4, 1), (4, 32)]


def test_run_benchmark_tiny() -> None:
    records, env = run_benchmark(
        models=("micronet_m0", "mobilenetv3_small_050"),
        paths=("eager", "deploy", "ort-fused", "ort-plain", "ort-legacy"),
        runs=2,
        warmup=1,
        img_size=32,
        threads=1,
        batch=1,
        log=lambda msg: None,
    )
    keys = {(r.model, r.path, r.threads, r.batch) for r in records}
    assert ("micronet_m0", "ort-plain", 1, 1) in keys
    assert ("mobilenetv3_small_050", "ort-plain", 1, 1) not in keys  # plain export only for MicroNet
    assert ("micronet_m0", "ort-legacy", 1, 1) in keys
    assert (("micronet_m0", "ort-fused", 1, 1) in keys) == bool(shutil.which("cc") or shutil.which("gcc"))
    assert ("mobilenetv3_small_050", "ort-fused", 1, 1) not in keys  # the fused operator is MicroNet's
    assert all(r.median_ms > 0 for r in records)
    assert "torch" in env and "cpu" in env
    text = markdown(records, env)
    assert "micronet_m0" in text and "ONNX nodes" in text and "Targets" not in text  # users see no targets
    assert "Targets" in markdown(records, env, show_targets=True)


def test_targets_text() -> None:
    def rec(m: str, p: str, ms: float) -> Record:
        return Record(m, p, 1, 1, ms, ms, ms, 50, 1000 / ms)

    lines = targets([rec("micronet_m0", "ort", 0.3), rec("mobilenetv3_small_050", "ort", 0.5)])
    assert lines and "met" in lines[0] and "NOT" not in lines[0]
    lines = targets([rec("micronet_m3", "ort", 1.0), rec("micronet_m3", "ort-legacy", 1.5)])
    assert lines and "plain export" in lines[0] and "1.50x" in lines[0] and "NOT" not in lines[0]
    ref = rec("mobilenetv3_small_050", "ort", 0.5)
    lines = targets([rec("micronet_m0", "ort", 0.45), rec("micronet_m0", "ort-fused", 0.3), ref])
    assert len(lines) == 2 and "0.90x" in lines[0] and "NOT met" in lines[0]
    assert "M0 ort-fused" in lines[1] and "0.60x" in lines[1] and "NOT" not in lines[1]


def test_cli_json(tmp_path, capsys) -> None:
    rc = main(
        [
            "bench",
            "--models",
            "micronet_m0",
            "--paths",
            "eager",
            "ort-int8",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--img-size",
            "32",
            "--batch",
            "1",
            "--threads",
            "1",
            "--json",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["path"] for r in records} == {"eager", "ort-int8"}
    for r in records:
        assert {"model", "path", "threads", "batch", "median_ms"} <= set(r)
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.md").is_file()
    before = (tmp_path / "bench.json").read_bytes()
    assert main(["bench", "--paths", "eager", "--runs", "1", "--out-dir", str(tmp_path)]) == 2  # before any work
    assert "holds an earlier run's bench.json: give a new --out-dir, or --overwrite" in capsys.readouterr().err
    assert (tmp_path / "bench.json").read_bytes() == before
    (tmp_path / "bench-runtimes.json").write_text("{}")  # each table's own file: --runtimes checks its own
    assert main(["bench", "--runtimes", "ort", "--out-dir", str(tmp_path), "--runs", "1"]) == 2
    assert "holds an earlier run's bench-runtimes.json" in capsys.readouterr().err


def test_cli_unknown_model(capsys) -> None:
    rc = main(["bench", "--models", "no_such_net", "--paths", "eager", "--runs", "1", "--img-size", "32"])
    assert rc == 2


def test_trained_like_batchnorm() -> None:
    """The bench's models get non-default BatchNorm statistics (seeded), so border corrections stay in the graph."""
    from micronet_torch.deploy import EdgeCorrectedConv, PhaseStemConv, convert_to_deploy
    from micronet_torch.tools.bench import bench_model as build_model
    from micronet_torch.tools.bench import trained_like

    bn_type = torch.nn.modules.batchnorm._BatchNorm
    a = trained_like(build_model("micronet_m0"), seed=3, img_size=32)
    b = trained_like(build_model("micronet_m0"), seed=3, img_size=32)
    assert not a.training
    bns_a = [m for m in a.modules() if isinstance(m, bn_type)]
    bns_b = [m for m in b.modules() if isinstance(m, bn_type)]
    assert bns_a and all(bn.momentum == 0.1 for bn in bns_a)  # momentum restored after calibration
    for bn_a, bn_b in zip(bns_a, bns_b, strict=True):
        assert torch.equal(bn_a.weight, bn_b.weight) and torch.equal(bn_a.bias, bn_b.bias)  # seeded
        assert bn_a.bias.abs().sum() > 0 and (bn_a.running_mean != 0).any() and (bn_a.running_var != 1).any()
        assert torch.isfinite(bn_a.running_var).all()
    deployed = convert_to_deploy(a, backend="onnx")
    edges = [m.edge for m in deployed.modules() if isinstance(m, EdgeCorrectedConv)]
    edges += [m.edge_a for m in deployed.modules() if isinstance(m, PhaseStemConv)]
    assert edges and all(e.abs().max() > 0 for e in edges)


def test_gpu_script_smoke_on_cpu(tmp_path) -> None:
    """benchmarks/gpu_bench.py has never had a GPU here: its CPU smoke mode runs every code path."""
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--device",
            "cpu",
            "--quick",
            "--compile-backend",
            "eager",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["fused_dsm"]["ok"] and result["fused_dsm"]["forward_rel_diff"] < 1e-5
    assert {r["model"] for r in result["rows"]} == {"micronet_m0", "mobilenetv3_small_100"}
