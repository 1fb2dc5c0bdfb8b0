"""Every export target of the portable form, run in its own runtime: parity with the eager model (skipped with
the reason when the runtime's package is not installed), and the ExecuTorch program's delegate coverage."""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch
from helpers import SHARED_FIXTURES
from micronet_torch.bench import trained_like

import micronet_torch
from micronet_torch.deploy_portable import RUNTIME_OPTIONS, convert_to_portable

TOL = 2e-5
# runtime -> the packages its export and its loader import
PACKAGES = {
    "openvino": ("openvino",),
    "executorch": ("executorch",),
    "litert": ("litert_torch", "ai_edge_litert"),
    "ncnn": ("pnnx", "ncnn"),
}
# what a Dynamic Shift-Max lowers to: none of these may run outside the XNNPACK delegate
DSM_OPS = ("mean", "convolution", "relu", "hardsigmoid", "clamp", "mul", "add", "maximum", "cat", "slice")


def _runtime(rt: str):
    missing = [p for p in PACKAGES[rt] if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install micronet-torch[{rt}])")
    return importlib.import_module(f"micronet_torch.runtime.{rt}")


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("rt", list(PACKAGES))
@pytest.mark.parametrize("name", ["micronet_m0", "micronet_m3"])
def test_parity(rt: str, name: str, tmp_path) -> None:
    mod = _runtime(rt)
    model = trained_like(micronet_torch.create_model(name))
    shape = (1, 3, 64, 64)
    meta = {"input_name": "input", "input_size": [3, 64, 64], "mean": [0.485, 0.456, 0.406]}
    portable = convert_to_portable(model, **RUNTIME_OPTIONS[rt])  # the form each runtime is fastest with
    path = getattr(mod, f"export_{rt}")(portable, tmp_path / name, shape, meta)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel(getattr(mod, f"load_{rt}")(path)(x.numpy()), ref) <= TOL


def test_fixture_through_openvino(tmp_path) -> None:
    mod = _runtime("openvino")
    ckpt = SHARED_FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
    if not ckpt.is_file():
        pytest.skip("fixtures not available")
    ref = torch.load(SHARED_FIXTURES / "official" / "micronet-m0-official-io.pt", weights_only=True)
    model = micronet_torch.create_model("micronet_m0", pretrained=str(ckpt)).eval()
    path = mod.export_openvino(convert_to_portable(model), tmp_path / "m0", tuple(ref["input"].shape), {"a": "b"})
    assert _rel(mod.load_openvino(path)(ref["input"].numpy()), ref["logits"].numpy()) <= TOL


def test_executorch_dsm_inside_delegate() -> None:
    mod = _runtime("executorch")
    edge = mod.lower_xnnpack(convert_to_portable(micronet_torch.create_model("micronet_m0").eval()), (1, 3, 64, 64))
    outside = mod.ops_outside_delegate(edge)
    assert not [op for op in outside if any(w in op for w in DSM_OPS)], outside
    assert mod.delegate_count(edge) == 1
