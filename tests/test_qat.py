"""Quantization-aware training (``deploy.qat``, ``micronet train --qat``): fake quantization where the int8 file
quantizes, a run that fine-tunes a float checkpoint, resumes bit-exactly and whose checkpoint eval and export read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import micronet_torch
from micronet_torch import train as engine
from micronet_torch.cli import main
from micronet_torch.deploy import convert_to_deploy
from micronet_torch.deploy.qat import (
    FUSED_ACTIVATIONS,
    FUSING_PRODUCERS,
    FakeQuant,
    QatNet,
    fake_quant_weight,
    qat_net,
    with_qat,
)
from micronet_torch.tools.bench import trained_like
from micronet_torch.train.recipes import RECIPES


def test_weights_round_to_per_channel_int8() -> None:
    """Each output channel on its own symmetric int8 grid (scale max|w| / 127, values -127..127), the channel's
    largest weight kept exactly; rounding twice changes nothing (the export re-quantizes without loss)."""
    w = torch.randn(6, 4, 3, 3) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.5]).view(6, 1, 1, 1)
    q = fake_quant_weight(w)
    scale = w.abs().flatten(1).amax(1) / 127
    steps = q / scale.view(6, 1, 1, 1)
    assert torch.equal(steps.round().abs().amax((1, 2, 3)), torch.full((6,), 127.0))
    assert float((steps - steps.round()).abs().max()) < 1e-3
    assert torch.equal(q.abs().flatten(1).amax(1), w.abs().flatten(1).amax(1))
    assert torch.equal(fake_quant_weight(q), q)
    w.requires_grad_(True)
    fake_quant_weight(w).sum().backward()  # straight-through
    assert torch.equal(w.grad, torch.ones_like(w))


def test_linear_weights_round_to_per_tensor_int8() -> None:
    """A linear layer's weights (the file's FULLY_CONNECTED, quantized per tensor) on one symmetric int8 grid,
    scale max|w| / 127 over the whole tensor; idempotent, with a straight-through gradient."""
    w = torch.randn(6, 4) * torch.tensor([1e-3, 0.1, 1, 10, 100, 0.5]).view(6, 1)
    q = fake_quant_weight(w, per_tensor=True)
    steps = q / (w.abs().max() / 127)
    assert float(steps.round().abs().max()) == 127.0 and float((steps - steps.round()).abs().max()) < 1e-3
    assert torch.equal(q[0], torch.zeros(4))  # 1e-3 of a 100-scale tensor: under half a step
    assert torch.equal(fake_quant_weight(q, per_tensor=True), q)
    w.requires_grad_(True)
    fake_quant_weight(w, per_tensor=True).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_fake_quant_range_holds_zero_and_follows_batches() -> None:
    """The first batch sets the range, later ones move it by ``momentum``; 0 is always a grid point; eval fixes it."""
    fq = FakeQuant(momentum=0.5)
    fq.train()
    fq(torch.tensor([1.0, 3.0]))
    assert (float(fq.lo), float(fq.hi)) == (1.0, 3.0)
    fq(torch.tensor([-1.0, 5.0]))
    assert (float(fq.lo), float(fq.hi)) == (0.0, 4.0)
    scale, zero = fq.qparams()
    assert int(zero) == -128 and float(scale) == pytest.approx(4.0 / 255)
    fq.eval()
    y = fq(torch.tensor([0.0, 2.0, 9.0, -3.0]))
    assert float(y[0]) == 0.0 and float(y[2]) == pytest.approx(4.0) and float(y[3]) == 0.0
    assert (float(fq.lo), float(fq.hi)) == (0.0, 4.0)


@pytest.fixture(scope="module")
def m0_qat() -> tuple[torch.nn.Module, QatNet]:
    torch.manual_seed(0)
    model = trained_like(micronet_torch.create_model("micronet_m0", num_classes=10)).eval()
    return model, qat_net(model, 32, 3)


def test_qat_net_quantizes_the_mcu_graph(m0_qat) -> None:
    """One ``FakeQuant`` per requantizing op of the ``mcu`` graph; the ops whose output a fused activation
    requantizes are conv / add / sub / mul followed by their relu; before training (ranges unset) the net is the
    float graph, and with ranges observed it stays within int8 noise of it."""
    model, qnet = m0_qat
    graph = convert_to_deploy(model, backend="mcu")
    assert len(qnet.fq) == len(qnet.ops) > 100 and 0 < len(qnet.fused) < len(qnet.ops)
    # the coefficient path's first layer: batched matmul, then its bias add carrying the relu
    assert {qnet.ops[k] for k in qnet.fused} <= FUSING_PRODUCERS and "add" in {qnet.ops[k] for k in qnet.fused}
    assert "maximum" in qnet.ops and "hardsigmoid" in qnet.ops  # Dynamic Shift-Max's max and coefficients
    assert qnet.ops.count("bmm") == 30  # 15 Dynamic Shift-Maxes' two coefficient layers (BATCH_MATMUL)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = graph(x)
        qnet.train()
        qnet(x)  # observe the ranges
        qnet.eval()
        out = qnet(x)
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.25, rel
    assert set(FUSED_ACTIVATIONS) >= {"relu", "relu6"}


def test_float_graph_holds_int8_weights(m0_qat) -> None:
    """``float_graph`` is the deploy graph with every weight already on its int8 grid: conv weights per output
    channel, the coefficient layers' batched-matmul weights per tensor (as the file stores them); in the 1 x 1 conv
    coefficient form every weight is per channel. The QAT graph rounds the matmul weights so as it runs."""
    from micronet_torch.deploy.mcu import MatMulLinear

    model, qnet = m0_qat
    graph = qnet.float_graph()
    convs = [m for m in graph.modules() if isinstance(m, torch.nn.Conv2d)]
    matmuls = [m for m in graph.modules() if isinstance(m, MatMulLinear)]
    assert len(convs) > 10 and len(matmuls) == 30 and qnet.fc_per_tensor
    assert all(torch.equal(fake_quant_weight(m.weight), m.weight) for m in convs)
    assert all(torch.equal(fake_quant_weight(m.weight, per_tensor=True), m.weight) for m in matmuls)
    assert not any(isinstance(m, (FakeQuant, QatNet)) for m in graph.modules())
    conv_form = qat_net(model, 32, 3, coefficients="conv")
    assert not conv_form.fc_per_tensor and "bmm" not in conv_form.ops
    assert "conv2d" in {conv_form.ops[k] for k in conv_form.fused}  # its coefficient conv carries the relu
    weights = [m.weight for m in conv_form.float_graph().modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(weights) > 40 and all(torch.equal(fake_quant_weight(w), w) for w in weights)
    calls = []
    original = fake_quant_weight

    def spy(w: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
        calls.append((tuple(w.shape), per_tensor))
        return original(w, per_tensor)

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr("micronet_torch.deploy.qat.fake_quant_weight", spy)
        qnet.eval()(torch.zeros(1, 3, 32, 32))
    assert sum(per_tensor and len(shape) == 3 for shape, per_tensor in calls) == 30  # bmm's (N, I, O) weights


def test_linear_coefficient_form_rounds_linear_weights_per_tensor(m0_qat) -> None:
    """With ``coefficients="linear"`` (the Dynamic Shift-Maxes' coefficient layers as FULLY_CONNECTED, quantized per
    tensor) the QAT graph rounds every linear weight per tensor, conv weights per channel, and a coefficient
    path's first linear layer carries its relu; a state dict of the conv form loads into it (same weights)."""
    model, matmul_qnet = m0_qat
    qnet = qat_net(model, 32, 3, coefficients="linear")
    assert qnet.fc_per_tensor and qnet.ops.count("linear") == 30  # 15 Dynamic Shift-Maxes' two (the head: 1 x 1 convs)
    assert "linear" in {qnet.ops[k] for k in qnet.fused}
    graph = qnet.float_graph()
    convs = [m for m in graph.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in graph.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) > 10 and len(linears) == 30
    assert all(torch.equal(fake_quant_weight(m.weight), m.weight) for m in convs)
    assert all(torch.equal(fake_quant_weight(m.weight, per_tensor=True), m.weight) for m in linears)
    qnet.load_state_dict(qat_net(model, 32, 3, coefficients="conv").state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = matmul_qnet.graph(x)
        assert torch.allclose(qnet.graph(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    # a state dict of the form whose head was two linear layers (2-D weights) loads into the 1 x 1 conv head
    state = {
        k: v.flatten(1) if k.startswith("graph.head.") and v.dim() == 4 else v for k, v in qnet.state_dict().items()
    }
    assert any(v.dim() == 2 for k, v in state.items() if k.startswith("graph.head."))
    qnet.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(qnet.graph(x), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert not any(isinstance(m, (FakeQuant, QatNet)) for m in graph.modules())


def test_pixel_graph_trains_the_folded_stem(m0_qat) -> None:
    """With the data's mean and std (what ``micronet train --qat`` passes) the QAT graph is the int8 file's own:
    camera pixels in (rounded to integers, range 0..255 fixed), the normalization folded into the stem conv, whose
    folded 4 x 4 weights are the ones rounded; in float it equals the network, gradients reach the stem conv and
    not the normalization; its export graph takes normalized images for every target and is the pixel graph the
    ``tflm`` export quantizes; a state dict of either form restores into its own form."""
    from micronet_torch.deploy.pixel_input import PixelInput, PixelStem, mcu_graph
    from micronet_torch.deploy.qat import Int8Graph, restore_qat

    model, old = m0_qat
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    qnet = qat_net(model, 32, 3, norm, stem="merged")  # the separable stem (the default): test_mcu_stem.py
    assert qnet.pixels and isinstance(qnet.graph, PixelInput) and qnet.graph.folded
    assert len(qnet.fq) == len(old.fq)  # the stem's ADD of its border map in place of the normalization op
    pixels = torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(3)).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in norm)
    x = (pixels.permute(0, 3, 1, 2) / 255 - mean) / std
    assert torch.allclose(qnet.graph_input(x), pixels, rtol=0, atol=1e-3)
    with torch.no_grad():
        ref = model(x)
        assert float((qnet.graph(qnet.graph_input(x)) - ref).abs().max() / ref.abs().max()) <= 2e-5
    qnet.train()
    qnet(x).square().mean().backward()
    stem = qnet.graph.body.features[0]
    assert isinstance(stem, PixelStem) and stem.trainable and float(stem.conv.weight.grad.abs().sum()) > 0
    assert stem.norm.weight.grad is None and (float(qnet.input_quant.lo), float(qnet.input_quant.hi)) == (0, 255)
    qnet.eval()
    exported = Int8Graph(qnet)
    frozen = exported.pixel_graph.body.features[0]
    assert not frozen.trainable and frozen.weight.shape[-2:] == (4, 4)
    assert torch.equal(frozen.weight, fake_quant_weight(stem.folded(torch.float32)[0].detach()))
    assert mcu_graph(exported, *norm) is exported.pixel_graph
    with torch.no_grad():
        assert torch.allclose(exported(x), exported.pixel_graph(pixels), rtol=0, atol=1e-4)
    assert restore_qat(model, qnet.state_dict(), 32, 3, norm).pixels
    assert not restore_qat(model, old.state_dict(), 32, 3, norm).pixels  # a run of the earlier form
    convs = restore_qat(model, qat_net(model, 32, 3, norm, coefficients="conv").state_dict(), 32, 3, norm)
    assert convs.pixels and not convs.fc_per_tensor  # a run of the 1 x 1 conv coefficient form keeps its form
    # greyscale training with a 3-value mean and std: the pixel graph inverts the normalization the images had
    # (the pipeline's channel_stats: the values averaged), not the first channel's
    grey = trained_like(micronet_torch.create_model("micronet_m0", num_classes=10, in_chans=1)).eval()
    gnorm = qat_net(grey, 32, 1, norm).graph.norm
    mean1, std1 = sum(norm[0]) / 3, sum(norm[1]) / 3
    assert float(gnorm.bias) == pytest.approx(-mean1 / std1) and float(gnorm.weight) == pytest.approx(1 / (255 * std1))


def test_qat_refuses_what_it_cannot_train(tmp_path: Path, tiny_folder: Path, capsys) -> None:
    """``--qat`` with ``--amp`` (the int8 graph trains in float32): one line, exit 2, nothing trained."""
    base = ["train", "--data", str(tiny_folder), "--img-size", "20", "--workers", "0", "--qat"]
    assert main([*base, "--pretrained", "x.pt", "--amp", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "drop --amp" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_qat_without_pretrained_trains_the_float_network_first(tmp_path: Path, tiny_folder: Path) -> None:
    """``--qat`` from scratch: the float run in OUTPUT/float (the epochs given), then the QAT fine-tuning of its
    best.pt in OUTPUT (the qat recipe, the float run's image size); ``--resume`` of the finished run trains
    neither again."""
    out = tmp_path / "run"
    args = ["train", "--qat", "--data", str(tiny_folder), "--epochs", "1", "--img-size", "20", "--batch-size", "6"]
    args += ["--workers", "0", "--quiet", "--output", str(out)]
    assert main(args) == 0
    float_run = torch.load(out / "float" / "last.pt", weights_only=True)
    assert float_run["config"]["qat"] is False and float_run["config"]["recipe"] == "default"
    assert float_run["epoch"] == 1 and float_run["config"]["epochs"] == 1
    qat = torch.load(out / "last.pt", weights_only=True)
    cfg = qat["config"]
    assert cfg["qat"] is True and cfg["recipe"] == "qat" and cfg["pretrained"] == str(out / "float" / "best.pt")
    assert cfg["epochs"] == RECIPES["qat"].epochs == qat["epoch"] and cfg["img_size"] == 20
    assert any(k.startswith("fq.") for k in qat["model"]) and qat["float_model"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "float" / "best.pt", out / "best.pt")}
    assert main([*args, "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


class StopAfter(Exception):
    pass


@pytest.fixture(scope="module")
def qat_runs(trained: Path, tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared trained run fine-tuned with ``--qat`` for 2 epochs: straight, and stopped after epoch 1's
    checkpoint then resumed."""
    root = tmp_path_factory.mktemp("qat")
    args = ["train", "--qat", "--pretrained", str(trained / "best.pt"), "--data", str(tiny_folder), "--epochs", "2"]
    args += ["--img-size", "20", "--batch-size", "6", "--workers", "0", "--quiet", "--output"]
    assert main([*args, str(root / "straight")]) == 0
    original = engine.Trainer._end_epoch

    def end_then_stop(self, epoch: int, train_m: dict) -> None:
        original(self, epoch, train_m)
        if epoch == 0:
            raise StopAfter

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine.Trainer, "_end_epoch", end_then_stop)
        with pytest.raises(StopAfter):
            main([*args, str(root / "resumed")])
    assert main([*args, str(root / "resumed"), "--resume"]) == 0
    return {"straight": root / "straight", "resumed": root / "resumed"}


def test_qat_run_saves_its_graph_and_resumes_bit_exactly(qat_runs: dict[str, Path]) -> None:
    """The checkpoint's model is the int8 graph (weights, and a range per requantizing op), with the float
    network it started from; resumed after epoch 1, the run ends with the same tensors as the straight run."""
    a = torch.load(qat_runs["straight"] / "last.pt", weights_only=True)
    b = torch.load(qat_runs["resumed"] / "last.pt", weights_only=True)
    assert a["config"]["qat"] is True and a["config"]["recipe"] == "qat" and a["epoch"] == 2
    assert any(k.startswith("fq.") and k.endswith(".hi") for k in a["model"])
    assert any(k.startswith("graph.") for k in a["model"]) and "stem.0.conv.weight" not in a["model"]
    assert "graph.body.features.0.conv1.weight" in a["model"]  # the pixel graph: the normalization in the stem
    assert a["float_model"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    keys = ("train_loss", "val_loss", "val_top1", "lr")
    assert [[m[k] for k in keys] for m in a["metrics"]] == [[m[k] for k in keys] for m in b["metrics"]]


def test_qat_checkpoint_is_evaluated_and_exported_as_its_graph(qat_runs: dict[str, Path], tiny_folder: Path, capsys):
    """``micronet eval`` of a ``--qat`` checkpoint runs its int8-simulated graph (the top-1 the run recorded for
    that epoch); ``export`` takes the graph with int8-rounded weights (any target; ``tflm`` quantizes it)."""
    from micronet_torch.cli.export import _loaded
    from micronet_torch.models import load_model

    best = qat_runs["straight"] / "best.pt"
    loaded = with_qat(load_model(best))
    assert isinstance(loaded.model, QatNet) and not loaded.model.training
    assert main(["eval", "-c", str(best), "--data", str(tiny_folder), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((qat_runs["straight"] / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["best_top1"], abs=1e-6)

    class Args:
        checkpoint, model, img_size, num_classes, in_chans = str(best), None, None, None, None

    graph = _loaded(Args).model
    assert not isinstance(graph, (QatNet, micronet_torch.MicroNet))
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        rel = float((graph(x) - loaded.model(x)).abs().max() / loaded.model(x).abs().max())
    assert rel < 0.25


@pytest.mark.runtime  # LiteRT's converter and interpreter
def test_tflm_export_takes_the_trained_ranges(qat_runs: dict[str, Path], tmp_path: Path) -> None:
    """The int8 file's activation tensors that the run quantized keep the trained range (scale ``(hi - lo) / 255``,
    0 inside): the quantizer changes none, so the simulation trained what the file computes (a maximum's inputs
    take its range, a hard-sigmoid is quantized as relu6(z + 3) then / 6, as the converter writes them)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from micronet_torch.deploy.pixel_input import mcu_graph
    from micronet_torch.models import load_model
    from micronet_torch.runtime import mcu
    from micronet_torch.tools.bench_mcu import synthetic_pixels

    loaded = with_qat(load_model(qat_runs["straight"] / "best.pt"), True)
    cfg = loaded.data_config
    graph = mcu_graph(loaded.model, tuple(cfg.mean), tuple(cfg.std))
    pixels = synthetic_pixels(8, 20, seed=1)[..., : cfg.in_chans]
    float_path = mcu.float_tflite(graph, tmp_path / "float.tflite", (1, 20, 20, cfg.in_chans))
    ranges = mcu.trained_ranges(float_path, loaded.model.qat_net, graph.norm, pixels)
    data = mcu.quantize_int8(float_path, pixels, ranges, mcu.fc_per_tensor(graph), keep_names=True)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    checked = 0
    for t in model.subgraphs[0].tensors:
        name = t.name.decode() if isinstance(t.name, bytes) else t.name
        if name not in ranges or t.type != 9:  # int8
            continue
        lo, hi = min(ranges[name][0], 0.0), max(ranges[name][1], 0.0)
        assert float(t.quantization.scale[0]) == pytest.approx((hi - lo) / 255, rel=1e-3, abs=1e-9), name
        checked += 1
    assert checked >= 0.9 * len(ranges) > 50
