"""``micronet bench --runtimes``: per-runtime tables, parity and ratio lines, at a tiny setting."""

from __future__ import annotations

import json

import pytest

from micronet_torch.runtime import TARGETS
from micronet_torch.tools.bench_runtimes import (
    RuntimeRecord,
    markdown_runtimes,
    parse_runtimes,
    ratio_lines,
    run_runtime_benchmark,
)

pytestmark = pytest.mark.runtime  # native runtime libraries: run in a child process (tests/isolation.py)


def test_parse_runtimes() -> None:
    assert parse_runtimes("ort,openvino") == ("ort", "openvino")
    assert parse_runtimes(["ort", "tflite,ncnn"]) == ("ort", "tflite", "ncnn")
    with pytest.raises(ValueError, match="litert"):
        parse_runtimes("litert")


def test_ratio_lines() -> None:
    def rec(model: str, ms: float) -> RuntimeRecord:
        return RuntimeRecord("openvino", model, ms, ms, ms, 10, 1e-7, 1.0)

    records = [rec("micronet_m0", 0.4), rec("mobilenetv3_small_050", 0.5), rec("micronet_m3", 1.2)]
    (plain,) = ratio_lines(records)
    ratio = "openvino: micronet_m0 / mobilenetv3_small_050 = 0.400 / 0.500 ms = 0.80x"
    assert plain == f"{ratio}, fastest runs 0.400 / 0.500 ms = 0.80x"  # no target in the printed tables
    lines = ratio_lines(records, show_targets=True)
    assert len(lines) == 1 and "openvino" in lines[0] and "0.80x" in lines[0] and "met" in lines[0]
    assert "NOT" not in lines[0]
    # the verdict is on the medians; the fastest runs come beside it
    noisy = [RuntimeRecord("ort", "micronet_m0", 1.0, 1.0, 0.3, 10, 1e-7, 1.0)]
    noisy.append(RuntimeRecord("ort", "mobilenetv3_small_050", 1.0, 1.0, 0.6, 10, 1e-7, 1.0))
    (line,) = ratio_lines(noisy, show_targets=True)
    assert "= 1.00x (target <= 0.85x: NOT met), fastest runs 0.300 / 0.600 ms = 0.50x" in line
    table = markdown_runtimes(noisy, {})
    assert "| micronet_m0 | 1.000 | 0.300 | 1.00x | 1.0e-07 |" in table


def test_run_runtime_benchmark_tiny(tmp_path) -> None:
    runtimes = ("ort", "openvino") if TARGETS["openvino"].missing() is None else ("ort",)
    records, env = run_runtime_benchmark(
        models=("micronet_m0", "mobilenetv3_small_050"),
        runtimes=runtimes,
        runs=2,
        warmup=1,
        img_size=32,
        log=lambda msg: None,
        out_dir=tmp_path,
        max_seconds=1.0,
    )
    assert {(r.runtime, r.model) for r in records} == {(rt, m) for rt in runtimes for m in env["models"]}
    assert all(r.median_ms and r.median_ms > 0 and r.parity <= 2e-5 for r in records), records
    text = markdown_runtimes(records, env)
    assert "**ort**" in text and "micronet_m0 / mobilenetv3_small_050" in text
    data = json.loads((tmp_path / "bench-runtimes.json").read_text())
    assert len(data["records"]) == len(records)
