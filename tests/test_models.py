"""The matrix over every registered model (forward / backward, ONNX, features_only, classifier surface, every
deploy backend's parity), plus the published numbers (params, structure)."""

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from helpers import ABLATION_VARIANTS

import micronet_torch
from micronet_torch import MODEL_SPECS, create_model, list_models
from micronet_torch.deploy import BACKENDS, convert_to_deploy
from micronet_torch.ops import DynamicShiftMax

SPEC_NAMES = list(MODEL_SPECS)
SIZE = 64  # small inputs keep the CPU matrix fast; every model has output stride 32
DEPLOY_TOL = 2e-5  # of max|logits|: every deploy rewrite is exact up to float rounding
# one backend row per distinct graph form (rows with equal passes and emitter build the same graph)
DEPLOY_ROWS = list({(b.passes, b.emitter): name for name, b in BACKENDS.items()}.values())


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize(
    "name,params",
    [("micronet_m0", 1_019_590), ("micronet_m1", 1_777_587), ("micronet_m2", 2_393_876), ("micronet_m3", 2_622_960)],
)
def test_parameter_counts_are_the_published_ones(name, params):
    assert sum(p.numel() for p in create_model(name).parameters()) == params


@pytest.mark.parametrize(
    "name,residuals,dsm,dsm_k2,last",
    [
        ("micronet_m0", 0, 15, 8, 384),
        ("micronet_m1", 0, 15, 8, 576),
        ("micronet_m2", 1, 21, 12, 768),
        ("micronet_m3", 4, 11, 11, 864),
    ],
)
def test_structure_facts(name, residuals, dsm, dsm_k2, last):
    model = create_model(name)
    blocks = list(model.features)[1:]
    assert sum(b.use_residual for b in blocks) == residuals
    acts = [m for m in model.modules() if isinstance(m, DynamicShiftMax)]
    assert len(acts) == dsm and sum(a.k == 2 for a in acts) == dsm_k2
    assert model.num_features == last
    assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape[-2:] == (7, 7)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_train_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_eval_batch1_trace_export_onnx(name, tmp_path):
    torch.manual_seed(1)
    model = create_model(name).eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (1, 1000)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        # one program with a dynamic batch axis, run at batch 1 here
        two = torch.randn(2, 3, SIZE, SIZE)  # a batch of 1 would pin the axis to 1
        exported = torch.export.export(model, (two,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        torch.testing.assert_close(exported.module()(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    # the network's own graph through the TorchScript-based ONNX exporter (a tenth of the dynamo exporter's time),
    # with a dynamic batch axis; `micronet export`'s dynamo path and its deploy files are tests/test_runtime.py's
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}}
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        ref2 = model(x2).numpy()
    got = sess.run(None, {"x": x2.numpy()})[0]
    assert np.abs(got - ref2).max() <= 1e-4 * np.abs(ref2).max()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_features_only_reductions(name):
    model = timm.create_model(name, features_only=True)
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    feats = model(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[-1] for f in feats] == [SIZE // r for r in (2, 4, 8, 16, 32)]
    assert [f.shape[1] for f in feats] == model.feature_info.channels()


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_classifier_surface_and_in_chans(name):
    model = create_model(name, in_chans=1, num_classes=5).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    assert model(x).shape == (2, 5)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


def test_timm_create_model_and_names():
    model = timm.create_model("micronet_m3", num_classes=10)
    assert isinstance(model, micronet_torch.MicroNet) and model.num_classes == 10
    assert model.pretrained_cfg["crop_pct"] == 0.875
    assert set(timm.list_models("micronet_*")) >= set(list_models())
    with pytest.raises(ValueError, match="known models: micronet_m0"):
        create_model("micronet_m9")


@pytest.mark.parametrize(
    "alias,target",
    [("micronet_v1_m0", "micronet_m1"), ("micronet_v1_m1", "micronet_m2"), ("micronet_v1_m2", "micronet_m3")],
)
def test_preprint_aliases_build_the_published_models(alias, target, caplog):
    with caplog.at_level("INFO"):
        model = create_model(alias)
    assert model.spec.name == target
    assert target.replace("micronet_", "MicroNet-").upper()[-2:] in caplog.text


def test_preprint_m3_is_reconstructed():
    model = create_model("micronet_v1_m3")
    assert sum(p.numel() for p in model.parameters()) == 3_311_032
    assert "reconstructed" in model.spec.description


@pytest.mark.parametrize("variant", ABLATION_VARIANTS)
def test_ablation_variants_build_and_differ(variant):
    base = create_model("micronet_m0")
    model = create_model("micronet_m0", **variant)
    x = torch.randn(2, 3, SIZE, SIZE)
    assert model(x).shape == (2, 1000)
    if "shift" not in variant:
        assert sum(p.numel() for p in model.parameters()) != sum(p.numel() for p in base.parameters())
    with pytest.raises(ValueError, match="unknown activation variant"):
        create_model("micronet_m0", activation="gelu")


@pytest.mark.parametrize("name", SPEC_NAMES)
@pytest.mark.parametrize("width", [0.5, 0.85, 1.5])
def test_width_scaling_builds_every_model(name, width):
    model = create_model(name, width=width, pointwise="plain", num_classes=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    base = sum(p.numel() for p in create_model(name, num_classes=3, pointwise="plain").parameters())
    scaled = sum(p.numel() for p in model.parameters())
    assert (scaled < base) if width < 1 else (scaled > base)


def test_plain_pointwise_at_matched_madds():
    base = micronet_torch.profile(create_model("micronet_m0", num_classes=10), img_size=32).madds
    plain = micronet_torch.profile(create_model("micronet_m0", num_classes=10, pointwise="plain"), img_size=32).madds
    narrow = create_model("micronet_m0", num_classes=10, pointwise="plain", width=0.85)
    assert plain > 1.2 * base  # ungrouped 1x1 convolutions cost more at the same width
    assert abs(micronet_torch.profile(narrow, img_size=32).madds / base - 1) < 0.10


@pytest.mark.parametrize("backend", DEPLOY_ROWS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_deploy_parity(name, backend):
    """Every registered network (the preprint's names build the same ones) through every deploy backend row: the
    same logits as eager, BatchNorm statistics and affines random so that every fold matters."""
    torch.manual_seed(0)
    model = create_model(name).eval()
    _randomize_bn(model)
    deployed = convert_to_deploy(model, backend=backend)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= DEPLOY_TOL
