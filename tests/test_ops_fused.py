"""The fused Dynamic Shift-Max (CPU C kernel; Triton under its interpreter) against the eager module."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import micronet_torch
from micronet_torch.ops import DynamicShiftMax, set_shift_max_impl, shift_index, shift_max_fusion, use_shift_max_impl
from micronet_torch.ops import shift_max_fused as fused


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    """Build the CPU kernels into a temporary cache, not ~/.cache; skip when they cannot build here."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MICRONET_TORCH_HOME", str(tmp_path_factory.mktemp("micronet-home")))
    fused._cpu_kernels.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = fused.cpu_available()
    if not ok:
        pytest.skip("no working C compiler: the fused CPU kernel cannot build (the eager path is used)")
    yield
    mp.undo()


KJ = [(1, 1), (1, 2), (2, 1), (2, 2)]
MODES = ["published", "group"]
LAYOUTS = ["nchw", "nhwc"]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x.contiguous()


def _pair(k: int, j: int, mode: str, seed: int = 0, channels: int = 12, groups: int = 3):
    """Two identical DynamicShiftMax modules, one eager and one fused, with non-trivial weights."""
    torch.manual_seed(seed)
    eager = DynamicShiftMax(channels, groups, k=k, j=j, shift=mode, impl="eager")
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.5)
    fast = DynamicShiftMax(channels, groups, k=k, j=j, shift=mode, impl="fused")
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("k,j", KJ)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h,w", [(5, 7), (2, 3), (1, 1)])  # rows of H*W; by pixel (H*W <= 8); both layouts alike
def test_fused_matches_eager_forward_and_gradients(k, j, mode, layout, h, w):
    eager, fast = _pair(k, j, mode)
    gen = torch.Generator().manual_seed(k * 10 + j)
    n = int(torch.randint(1, 4, (1,), generator=gen))
    x = _layout(torch.randn(n, 12, h, w, generator=gen), layout)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yf = eager(xe), fast(xf)
    assert fast.resolved_impl(xf) == "fused"
    assert _rel(yf, ye) <= 1e-6
    assert yf.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
    g = torch.randn(ye.shape, generator=gen)
    ye.backward(g)
    yf.backward(g)
    assert _rel(xf.grad, xe.grad) <= 1e-5
    for pe, pf in zip(eager.parameters(), fast.parameters(), strict=True):
        assert _rel(pf.grad, pe.grad) <= 1e-5


@pytest.mark.parametrize("k,j", KJ)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h,w", [(3, 4), (2, 2)])
def test_fused_op_gradcheck_float64(k, j, mode, layout, h, w):
    c = 6
    index = shift_index(c, 2, mode)
    x = _layout(torch.randn(2, c, h, w, dtype=torch.float64), layout).requires_grad_()
    coef = torch.randn(2, k * j * c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused.fused_shift_max(a, b, index, k, j), (x, coef))


@pytest.mark.parametrize("k,j", KJ)
def test_library_op_and_direct_path_agree(k, j):
    """Eager CPU calls skip the torch.library dispatch (``_CpuFusedShiftMax``); the library op, which
    torch.compile and CUDA use, must give the same values and gradients (gradcheck for its own autograd)."""
    c = 6
    index = shift_index(c, 2, "published")
    x = torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(2, k * j * c, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fused.dsm_forward(a, b, index, k, j), (x, coef))
    y_lib, y_direct = fused.dsm_forward(x, coef, index, k, j), fused.fused_shift_max(x, coef, index, k, j)
    assert y_direct.grad_fn is not None and "CpuFusedShiftMax" in type(y_direct.grad_fn).__name__
    assert torch.equal(y_lib, y_direct)
    g = torch.randn_like(y_lib)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.autograd.grad(y_lib, (x, coef), g), torch.autograd.grad(y_direct, (x, coef), g), strict=True
        )
    )


@pytest.mark.parametrize("k,j", [(2, 2), (1, 2)])
def test_fused_module_gradcheck_float64(k, j):
    _, fast = _pair(k, j, "published", channels=8, groups=2)
    fast.double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast, (x,))


@pytest.mark.parametrize("j", [1, 2])
def test_ties_split_the_gradient_as_torch_maximum_does(j):
    c, n = 4, 2
    index = shift_index(c, 2)
    x = torch.randn(n, c, 3, 3)
    x[:, :, 0, 0] = 0.0  # a tie wherever both branches are linear in x
    half = torch.randn(n, 1, j * c)
    coef = torch.cat([half, torch.where(torch.rand_like(half) < 0.5, half, half + 1.0)], 1).reshape(n, -1)
    xe, ce = x.clone().requires_grad_(), coef.clone().requires_grad_()
    xf, cf = x.clone().requires_grad_(), coef.clone().requires_grad_()
    ye = shift_max_fusion(xe, ce.view(n, 2, j, c, 1, 1), index, 2, j)
    yf = fused.fused_shift_max(xf, cf, index, 2, j)
    assert torch.equal(yf, ye)
    g = torch.randn_like(ye)
    ye.backward(g)
    yf.backward(g)
    assert _rel(xf.grad, xe.grad) <= 1e-6
    assert _rel(cf.grad, ce.grad) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_under_autocast_matches_eager(dtype):
    eager, fast = _pair(2, 2, "published")
    x = torch.randn(2, 12, 4, 4).to(dtype)
    outs = []
    for m in (eager, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = m(xi)
        y.float().sum().backward()
        outs.append((y, xi.grad, m.fc[0].weight.grad))
    (ye, gxe, gwe), (yf, gxf, gwf) = outs
    assert yf.dtype == ye.dtype and gxf.dtype == gxe.dtype == dtype
    assert _rel(yf.float(), ye.float()) <= 1e-6
    assert _rel(gxf.float(), gxe.float()) <= 1e-2  # both rounded to 8 / 11 significant bits
    assert _rel(gwf, gwe) <= 1e-2


def test_opcheck_fake_and_autograd_registrations():
    index = shift_index(6, 3)
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    coef = torch.randn(2, 24, requires_grad=True)
    torch.library.opcheck(fused.dsm_forward, (x, coef, index, 2, 2))


def test_switch_and_state_dict():
    model = micronet_torch.create_model("micronet_m0")
    keys = set(model.state_dict())
    count = set_shift_max_impl(model, "eager")
    assert count > 0 and all(m.impl == "eager" for m in model.modules() if isinstance(m, DynamicShiftMax))
    assert set(model.state_dict()) == keys
    dsm = next(m for m in model.modules() if isinstance(m, DynamicShiftMax))
    x = torch.randn(1, dsm.channels, 4, 4)
    with use_shift_max_impl("fused"):
        assert dsm.resolved_impl(x) == "fused"
    assert dsm.resolved_impl(x) == "eager"
    dsm.impl = "auto"
    dsm.train()
    assert dsm.resolved_impl(x) == "fused"
    with torch.no_grad():
        assert dsm.resolved_impl(x) == "eager"  # inference and export see the eager ops
    dsm.eval()
    assert dsm.resolved_impl(x) == "eager"
    with pytest.raises(ValueError, match="impl"):
        set_shift_max_impl(model, "fast")
    with pytest.raises(ValueError, match="impl"):
        DynamicShiftMax(8, 2, impl="nope")


def test_no_compiler_falls_back_to_eager_with_a_warning(monkeypatch):
    def refuse(*args, **kwargs):
        raise fused.NativeBuildError("no C compiler was found")

    monkeypatch.setattr(fused, "open_library", refuse)
    fused._cpu_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="eager path"):
            ok = fused.available(torch.device("cpu"))
        assert not ok
        _, fast = _pair(2, 2, "published")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fast.resolved_impl(torch.randn(1, 12, 2, 2)) == "eager"
    finally:
        fused._cpu_kernels.cache_clear()


def _global_rel(a: dict, b: dict) -> float:
    """|a - b| / |b| over all the tensors together (per-tensor ratios are meaningless for the convolution
    biases in front of a BatchNorm: their gradient is zero in exact arithmetic and holds rounding noise)."""
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    return (num / sum((v.double() ** 2).sum() for v in b.values())).sqrt().item()


@pytest.mark.parametrize("name,batch", [("micronet_m0", 2), ("micronet_m3", 8)])
def test_training_steps_match_eager(name, batch):
    """Three SGD steps give the same losses and weights. M3 at 32x32 ends in 1x1 maps whose BatchNorm sees
    only the batch: with 2 images its steps are chaotic (eager against eager on a channels-last input
    already differs by ~1e-2 after 3 steps), so M3 takes 8 images, where eager agrees with itself to ~1e-4
    (step-3 loss) and fused agrees with eager to 1e-5 to 3e-5 (losses and weights, global norm) depending on
    the CPU's summation order, so M3's later steps are held to eager's own noise floor, 1e-4."""
    torch.manual_seed(0)
    model = micronet_torch.create_model(name, num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    results = {}
    for impl in ("eager", "fused"):
        torch.manual_seed(1)  # the same dropout masks
        model.load_state_dict(state)
        set_shift_max_impl(model, impl)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        losses, first_grads = [], None
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            first_grads = first_grads or {k: p.grad.clone() for k, p in model.named_parameters()}
            opt.step()
            losses.append(loss.item())
        results[impl] = losses, first_grads, {k: p.detach().clone() for k, p in model.named_parameters()}
    (le, ge, we), (lf, gf, wf) = results["eager"], results["fused"]
    assert lf[0] == le[0]  # the forward is bit-exact
    assert _global_rel(gf, ge) <= 1e-5
    later_steps = 1e-5 if name == "micronet_m0" else 1e-4
    for a, b in zip(lf, le, strict=True):
        assert abs(a - b) <= later_steps * abs(b)
    assert _global_rel(wf, we) <= later_steps


TRITON_CHECK = """
import torch
from micronet_torch.ops import shift_index, shift_max_fusion
from micronet_torch.ops.shift_max_triton import triton_backward, triton_forward
torch.manual_seed(0)
for k, j in ((1, 1), (1, 2), (2, 1), (2, 2)):
    for mode in ("published", "group"):
        for cl in (False, True):
            for dt in (torch.float32, torch.float64):
                n, c = 2, 8
                x = torch.randn(n, c, 5, 7, dtype=dt)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                idx = shift_index(c, 2, mode)
                coef = torch.randn(n, k * j * c, dtype=dt)
                xe, ce = x.clone().requires_grad_(), coef.clone().requires_grad_()
                ye = shift_max_fusion(xe, ce.view(n, k, j, c, 1, 1), idx, k, j)
                g = torch.randn_like(ye)
                ye.backward(g)
                y = triton_forward(x, coef, idx, k, j)
                gx, gc = triton_backward(x, coef, idx, torch.argsort(idx), g, k, j)
                tol = 1e-5 if dt == torch.float32 else 1e-12
                for a, b in ((y, ye), (gx, xe.grad), (gc, ce.grad)):
                    err = ((a - b).abs().max() / b.abs().max()).item()
                    assert err <= tol, (k, j, mode, cl, dt, err)
                assert y.stride() == x.stride()
print("ok")
"""


def test_triton_kernels_under_the_interpreter():
    """Forward and backward values, every (K, J), shift mode, layout, float32/64. The interpreter runs the
    kernels with numpy on the CPU: it cannot show GPU speed, compiled-code rounding (it may contract
    multiply-adds differently), or bfloat16 loads, which gpu_bench.py checks when a GPU is lent."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(micronet_torch.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ModuleNotFoundError" in proc.stderr:
        pytest.skip(f"triton not importable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_torch_compile_traces_the_fused_op():
    """Dynamo and AOTAutograd see the fused op through its fake and autograd registrations (aot_eager: no
    code generation, so the test stays fast); the compiled module trains like the eager one."""
    eager, fast = _pair(2, 2, "published")
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=False)
    x = torch.randn(2, 12, 4, 5)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = eager(xe), compiled(xc)
    assert _rel(yc, ye) <= 1e-6
    ye.sum().backward()
    yc.sum().backward()
    assert _rel(xc.grad, xe.grad) <= 1e-5
