"""The fused Dynamic Shift-Max operator: the C library in ONNX Runtime against PyTorch, the export, the errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import ABLATION_VARIANTS, official_model_and_io
from onnx import TensorProto, helper
from test_deploy import TOL, randomize, rel_diff

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy import FusedShiftMax, convert_to_deploy
from micronet_torch.deploy import fused as fused_ops
from micronet_torch.deploy.fused import FusedOpsUnavailable, library_path, shift_max, uses_fused_ops
from micronet_torch.runtime import export_onnx, ort_session, run_ort

if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
    pytest.skip("no C compiler to build the operator library (scripts/setup.sh installs gcc)", allow_module_level=True)


def op_model(index: list[int], k: int, j: int) -> bytes:
    node = helper.make_node("ShiftMax", ["x", "coef"], ["y"], domain="micronet", index=index, k=k, j=j)
    graph = helper.make_graph(
        [node],
        "shift_max",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("x", "coef")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("micronet", 1)])
    return model.SerializeToString()


def op_session(index: list[int], k: int, j: int, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 4
    fused_ops.register(so)
    return ort.InferenceSession(op_model(index, k, j), so, providers=["CPUExecutionProvider"])


def loop_reference(x: np.ndarray, coef: np.ndarray, index: list[int], k: int, j: int) -> np.ndarray:
    """The operator's definition, written out per channel (independent of ``fused_ops.shift_max``)."""
    n, c_out = x.shape[0], len(index) // j
    y = np.empty((n, c_out, *x.shape[2:]), np.float64)
    for b in range(n):
        for a in range(c_out):
            cf = coef[b, a * k * j : (a + 1) * k * j].reshape(k, j)
            rows = [x[b, index[a * j + jj]].astype(np.float64) for jj in range(j)]
            fusions = [sum(cf[kk, jj] * rows[jj] for jj in range(j)) for kk in range(k)]
            y[b, a] = np.maximum.reduce(fusions) if k > 1 else fusions[0]
    return y


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("k", "j"), [(2, 2), (1, 2), (2, 1), (1, 1)])
def test_operator_matches_definition(k: int, j: int, threads: int) -> None:
    rng = np.random.default_rng(k * 10 + j)
    for n, c_in, c_out, h, w in [(2, 6, 6, 5, 7), (3, 8, 12, 4, 1), (2, 16, 8, 40, 30)]:
        index = rng.integers(0, c_in, c_out * j).tolist()
        x = rng.standard_normal((n, c_in, h, w)).astype(np.float32)
        coef = rng.standard_normal((n, c_out * k * j)).astype(np.float32)
        y = op_session(index, k, j, threads).run(None, {"x": x, "coef": coef})[0]
        ref = loop_reference(x, coef, index, k, j)
        torch_ref = shift_max(torch.from_numpy(x), torch.from_numpy(coef), index, k, j).numpy()
        assert y.shape == ref.shape == torch_ref.shape == (n, c_out, h, w)
        assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
        assert np.abs(torch_ref - ref).max() <= 1e-5 * np.abs(ref).max()


def test_operator_rejects_bad_inputs() -> None:
    session = op_session([0, 5], k=1, j=1)
    with pytest.raises(Exception, match="x has 4 channels but index reads channel 5"):
        session.run(None, {"x": np.zeros((1, 4, 2, 2), np.float32), "coef": np.zeros((1, 2), np.float32)})
    with pytest.raises(Exception, match="coef has 3 values; expected N"):
        session.run(None, {"x": np.zeros((1, 6, 2, 2), np.float32), "coef": np.zeros((1, 3), np.float32)})
    with pytest.raises(Exception, match=r"must be \(N, C, H, W\)"):
        session.run(None, {"x": np.zeros((6, 2, 2), np.float32), "coef": np.zeros((1, 2), np.float32)})
    with pytest.raises(Exception, match="k and j in"):
        op_session([0, 1, 2], k=3, j=1)


@pytest.mark.parametrize("variant", [{}, *[v for v in ABLATION_VARIANTS if v.get("activation") == "dsm_j1"]])
def test_fused_deploy_matches_eager(variant: dict) -> None:
    model = randomize(micronet_torch.create_model("micronet_m0", **variant), seed=2)
    fused = convert_to_deploy(model, backend="onnx", fused_ops=True)
    dsm = [m for m in fused.modules() if isinstance(m, FusedShiftMax)]
    assert len(dsm) == 15 and all(m.fused_op for m in dsm)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(fused(x), model(x)) <= TOL


def test_fused_export_runs_in_onnx_runtime(tmp_path) -> None:
    model = randomize(micronet_torch.create_model("micronet_m0"), seed=3)
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    export_onnx(convert_to_deploy(model, backend="onnx", fused_ops=True), fused, (1, 3, 64, 64))
    export_onnx(convert_to_deploy(model, backend="onnx"), plain, (1, 3, 64, 64))
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("ShiftMax") == 15 and "MatMul" not in ops and "Max" not in ops
    assert uses_fused_ops(fused) and not uses_fused_ops(plain)
    x = torch.randn(3, 3, 64, 64)  # batch 3: the batch axis stays dynamic
    with torch.no_grad():
        ref = model(x)
    assert rel_diff(torch.from_numpy(run_ort(ort_session(fused), x)), ref) <= TOL
    assert rel_diff(torch.from_numpy(run_ort(ort_session(fused, threads=2), x)), ref) <= TOL


def test_errors_say_what_to_do(tmp_path, monkeypatch) -> None:
    model = micronet_torch.create_model("micronet_m0").eval()
    with pytest.raises(ValueError, match="backend='onnx'"):
        convert_to_deploy(model, fused_ops=True)
    with pytest.raises(RuntimeError, match="needs the dynamo exporter"):
        fused = convert_to_deploy(model, "onnx", fused_ops=True)
        export_onnx(fused, tmp_path / "x.onnx", (1, 3, 32, 32), exporter="legacy")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FusedOpsUnavailable, match="no C compiler"):
        library_path(tmp_path / "empty")
    with pytest.raises(FusedOpsUnavailable, match="failed"):
        library_path(tmp_path / "bad", compiler="false")
    assert not list((tmp_path / "bad").glob("*"))  # nothing half-written left behind


def test_library_is_cached(tmp_path) -> None:
    first = library_path(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert library_path(tmp_path) == first and first.stat().st_mtime_ns == stamp


def test_cli_fused_ops(tmp_path, capsys) -> None:
    out = tmp_path / "m0.onnx"
    assert main(["export", "--model", "micronet_m0", "--img-size", "32", "--fused-ops", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parity vs PyTorch" in text and "OK" in text and "register_custom_ops_library" in text
    assert uses_fused_ops(out)
    rc = main(["export", "--model", "micronet_m0", "--fused-ops", "--format", "torchscript", "-o", str(tmp_path / "m")])
    assert rc == 2 and "drop --format torchscript" in capsys.readouterr().err


def test_official_fixture_through_onnx_runtime(tmp_path) -> None:
    """The published-format M0 (real BatchNorm statistics) through the fused graph in ONNX Runtime."""
    model, ref = official_model_and_io("m0")
    path = tmp_path / "m0.onnx"
    export_onnx(convert_to_deploy(model, backend="onnx", fused_ops=True), path, (1, *ref["input"].shape[1:]))
    assert rel_diff(torch.from_numpy(run_ort(ort_session(path), ref["input"])), ref["logits"]) <= TOL


def test_build_without_march_native(tmp_path) -> None:
    """A compiler that rejects -march=native (some clang targets) still gets a portable build."""
    wrapper = tmp_path / "cc-no-native"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *-march=native*) echo "unsupported" >&2; exit 1;; esac\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    path = library_path(tmp_path / "lib", compiler=str(wrapper))
    assert path.is_file() and path.stat().st_size > 0
