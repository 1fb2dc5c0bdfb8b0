"""``micronet export``: ONNX (dynamo with legacy fallback), TorchScript, torch.export, int8; parity printed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import micronet_torch
from micronet_torch.cli import main
from micronet_torch.deploy import convert_to_deploy
from micronet_torch.runtime import (
    ExportOptions,
    export_model,
    export_onnx,
    ort_nodes_after_optimization,
    ort_session,
    quantize_onnx,
    run_ort,
    synthetic_images,
)
from micronet_torch.runtime import export as export_module


@pytest.fixture(scope="module")
def m0():
    torch.manual_seed(0)
    model = micronet_torch.create_model("micronet_m0", num_classes=10).eval()
    with torch.no_grad():  # logits of a usable size, so relative parity means something
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def deploy_onnx(m0, tmp_path_factory: pytest.TempPathFactory):
    """M0's ONNX deploy graph exported once at 32 px (the export's default exporter), read by several tests."""
    path = tmp_path_factory.mktemp("onnx") / "m0.onnx"
    return export_onnx(convert_to_deploy(m0, backend="onnx"), path, (1, 3, 32, 32))


def test_onnx_dynamic_batch_parity(m0, deploy_onnx) -> None:
    res = deploy_onnx
    assert res.exporter in ("dynamo", "legacy") and res.nodes
    sess = ort_session(res.path)
    for n in (1, 4):
        x = torch.randn(n, 3, 32, 32)
        ref = m0(x).detach().numpy()
        out = run_ort(sess, x)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_deploy_graph_is_smaller(m0, tmp_path) -> None:
    """The deploy rewrites leave ONNX Runtime fewer nodes than the network as written (both files from one
    exporter, the legacy one: a tenth of the dynamo exporter's time on the unrewritten network)."""
    plain = export_onnx(m0, tmp_path / "plain.onnx", (1, 3, 32, 32), exporter="legacy")
    dep = export_onnx(convert_to_deploy(m0, backend="onnx"), tmp_path / "dep.onnx", (1, 3, 32, 32), exporter="legacy")
    assert ort_nodes_after_optimization(dep.path) < ort_nodes_after_optimization(plain.path)


def test_opset_is_the_one_asked_for(m0, tmp_path, capsys) -> None:
    """An opset below the dynamo exporter's 18 falls back to the legacy exporter (which writes it) instead of a
    silent opset-18 file; one no exporter writes is refused before any work, naming the flag."""
    import onnx

    res = export_onnx(convert_to_deploy(m0, backend="onnx"), tmp_path / "o13.onnx", (1, 3, 32, 32), opset=13)
    assert res.exporter == "legacy" and "wrote opset 18, not the requested 13" in res.notes[0]
    assert [o.version for o in onnx.load(str(res.path)).opset_import if o.domain in ("", "ai.onnx")] == [13]
    with pytest.raises(ValueError, match="--opset 3: ONNX export writes opsets 7-"):
        export_onnx(m0, tmp_path / "o3.onnx", (1, 3, 32, 32), opset=3)
    assert main(["export", "--model", "micronet_m0", "--opset", "99", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "--opset 99" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    fused = ["export", "--model", "micronet_m0", "--fused-ops", "--opset", "13", "-o", str(tmp_path / "f.onnx")]
    assert main(fused) == 2
    assert "drop --opset 13 (the dynamo exporter writes 18 and up)" in capsys.readouterr().err


def test_output_folder_is_refused(tmp_path, capsys) -> None:
    assert main(["export", "--model", "micronet_m0", "--format", "torchscript", "-o", str(tmp_path)]) == 2
    assert f"--output {tmp_path} is a folder: give the file to write, e.g. {tmp_path}/micronet_m0.ts" in (
        capsys.readouterr().err
    )


def test_legacy_exporter(m0, tmp_path) -> None:
    res = export_onnx(convert_to_deploy(m0, backend="onnx"), tmp_path / "l.onnx", (1, 3, 32, 32), exporter="legacy")
    x = torch.randn(2, 3, 32, 32)
    ref = m0(x).detach().numpy()
    assert np.abs(run_ort(ort_session(res.path), x) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_int8_runs_and_mostly_agrees(deploy_onnx, tmp_path) -> None:
    fp = deploy_onnx.path
    calib = synthetic_images(16, 3, 32)
    q = quantize_onnx(fp, tmp_path / "q.onnx", calib)
    out = run_ort(ort_session(q), calib)
    assert out.shape == (16, 10) and np.isfinite(out).all()
    # mixed precision: the first convolutions and the head linears stay float
    import onnx

    q2 = quantize_onnx(fp, tmp_path / "q2.onnx", calib, float_convs=3)
    graph = onnx.load(str(q2)).graph
    produced_by = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    is_float = [getattr(produced_by.get(n.input[1]), "op_type", None) != "DequantizeLinear" for n in convs]
    assert is_float[0] and not is_float[-1]
    # float_convs counts layers: a row-folded conv's Conv nodes (one input, one per multiplier) count once
    layers = list(dict.fromkeys(n.input[0] for n in convs))
    float_layers = {n.input[0] for n, f in zip(convs, is_float, strict=True) if f}
    assert len(layers) < len(convs)  # M0 at 32 px has row-folded convs
    assert float_layers == set(layers[:3])
    assert run_ort(ort_session(q2), calib).shape == (16, 10)


@pytest.mark.parametrize("fmt,suffix", [("onnx", "onnx"), ("torchscript", "ts"), ("exported-program", "pt2")])
def test_cli_formats(fmt: str, suffix: str, tmp_path, capsys) -> None:
    out = tmp_path / f"m.{suffix}"
    rc = main(["export", "--model", "micronet_m0", "--format", fmt, "--img-size", "32", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.is_file() and "parity vs PyTorch" in text and "OK" in text


def test_cli_int8_folder(tmp_path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "q.onnx"
    rc = main(
        ["export", "--model", "micronet_m0", "--img-size", "32", "--int8", "--calib", str(folder), "--output", str(out)]
    )
    text = capsys.readouterr().out
    # random weights on 6 noise images may fail the agreement check; a failing int8 file is not written
    assert "top-1 agreement" in text and (out.is_file() if rc == 0 else "not written" in text)


def test_cli_errors(tmp_path, capsys) -> None:
    assert main(["export", "--model", "micronet_m0", "--int8", "--output", str(tmp_path / "x.onnx")]) == 2
    assert "--calib" in capsys.readouterr().err
    rc = main(["export", "--model", "micronet_m0", "--format", "torchscript", "--int8", "--calib", "x", "-o", "y"])
    assert rc == 2
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "x.onnx")]) == 2


class _Converted(Exception):
    """Stops ``export_model`` right after it chose the deploy graph."""


@pytest.mark.parametrize(
    ("fmt", "backend"),
    [("onnx", "onnx"), ("openvino", "onnx"), ("executorch", "portable")],
)
def test_fused_ops_graph_per_format(fmt: str, backend: str, m0, tmp_path, monkeypatch) -> None:
    """``--fused-ops``: ONNX Runtime and OpenVINO (through ONNX, its extension) get ONNX's fused deploy graph,
    measured the faster one for the extension (docs/benchmarks.md); ExecuTorch the portable graph with
    its kernel calls."""
    seen: list[dict] = []

    def record(model, **kwargs):
        seen.append(kwargs)
        raise _Converted

    monkeypatch.setattr(export_module, "convert_to_deploy", record)
    with pytest.raises(_Converted):
        export_model(m0, tmp_path / "m", (1, 3, 32, 32), ExportOptions(format=fmt, fused_ops=True))
    assert seen[0]["backend"] == backend and seen[0]["fused_ops"] is True
