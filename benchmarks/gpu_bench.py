"""GPU training and inference throughput of MicroNet M0-M3 against mobilenetv3_small_100.

For each model: inference and training images/s with AMP and channels-last, with Dynamic Shift-Max eager,
fused (the Triton kernels on CUDA) and ``torch.compile`` of the whole model; and the fused Dynamic Shift-Max
and its ``torch.compile`` form checked against eager, forward and backward, within float tolerance. Meant
for a CUDA machine; ``--device cpu --quick`` runs every code path on tiny settings so the script can be
tested anywhere (CPU figures mean nothing here).

    python benchmarks/gpu_bench.py                      # CUDA, full settings
    python benchmarks/gpu_bench.py --device cpu --quick # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Callable

import timm
import torch
from torch import nn

import micronet_torch
from micronet_torch.ops import DynamicShiftMax, set_shift_max_impl

MODELS = ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3", "mobilenetv3_small_100")


def build(name: str) -> nn.Module:
    if name.startswith("micronet"):
        return micronet_torch.create_model(name)
    return timm.create_model(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(step: Callable[[], None], device: torch.device, batch: int, iters: int, warmup: int) -> float:
    """Images per second of ``step`` (one batch per call), after warm-up."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def bench_model(name: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    rows = []
    has_dsm = name.startswith("micronet")
    variants = [("eager", False), ("fused", False), ("fused", True)] if has_dsm else [("eager", False), ("eager", True)]
    for dsm, compiled in variants:
        model = build(name).to(device).to(memory_format=torch.channels_last)
        set_shift_max_impl(model, dsm)
        run = torch.compile(model, backend=args.compile_backend) if compiled else model
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device).to(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, 1000, (args.batch,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")

        def infer(run: nn.Module = run, x: torch.Tensor = x) -> None:
            with torch.inference_mode(), autocast(device, args.amp):
                run(x)

        def train(run=run, x=x, y=y, opt=opt, scaler=scaler) -> None:
            with autocast(device, args.amp):
                loss = nn.functional.cross_entropy(run(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        model.eval()
        inf = throughput(infer, device, args.batch, args.iters, args.warmup)
        model.train()
        tr = throughput(train, device, args.batch, args.iters, args.warmup)
        rows.append(dict(model=name, dsm=dsm, compiled=compiled, infer_img_s=round(inf, 1), train_img_s=round(tr, 1)))
        print(
            f"{name:24s} dsm={dsm:5s} compile={compiled!s:5s}  inference {inf:10.1f} img/s   training {tr:10.1f} img/s",
            flush=True,
        )
    return rows


def check_fused_dsm(device: torch.device, args: argparse.Namespace) -> dict:
    """The fused Dynamic Shift-Max (Triton on CUDA) and its torch.compile form vs eager: forward and input /
    weight gradients, and forward + backward speed."""
    torch.manual_seed(0)
    dsm = DynamicShiftMax(96, 8, k=2, init_a=(1.0, 0.5), init_b=(0.0, 0.5), impl="eager").to(device).train()
    size = 8 if args.quick else 28
    x = torch.randn(args.batch, 96, size, size, device=device, requires_grad=True)
    out_e = dsm(x)
    g = torch.randn_like(out_e)
    grads_e = torch.autograd.grad(out_e, [x, *dsm.parameters()], g)
    result: dict = {}
    ok = True
    for impl in ("fused", "compile"):
        dsm.impl = impl
        out_f = dsm(x)
        grads_f = torch.autograd.grad(out_f, [x, *dsm.parameters()], g)
        fwd = float((out_f - out_e).abs().max().detach() / out_e.abs().max().detach())
        bwd = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(grads_f, grads_e, strict=True)
        )
        ok_i = fwd <= 1e-5 and bwd <= 1e-4
        ok = ok and ok_i
        result[impl] = dict(forward_rel_diff=fwd, backward_rel_diff=bwd, ok=ok_i)

    def step(impl: str) -> Callable[[], None]:
        def run() -> None:
            dsm.impl = impl
            torch.autograd.grad(dsm(x), [x], g)

        return run

    speeds = {impl: throughput(step(impl), device, args.batch, args.iters, args.warmup) for impl in IMPLS}
    for impl in ("fused", "compile"):
        r = result[impl]
        print(
            f"DSM {impl} vs eager: forward rel diff {r['forward_rel_diff']:.2e}, backward rel diff "
            f"{r['backward_rel_diff']:.2e} ({'OK' if r['ok'] else 'FAIL'}); fwd+bwd {speeds['eager']:.0f} -> "
            f"{speeds[impl]:.0f} img/s"
        )
    fused = result["fused"]  # the headline figures: the fused kernels
    return dict(result, ok=ok, img_s=speeds, forward_rel_diff=fused["forward_rel_diff"],
                backward_rel_diff=fused["backward_rel_diff"])  # fmt: skip


IMPLS = ("eager", "fused", "compile")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu [cuda]")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of every code path")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the whole-model rows [inductor]; the CPU smoke test takes eager (dynamo's "
        "graph capture alone: no kernels generated, so the smoke test checks the script, not the compiler)",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.img_size, args.iters, args.warmup = 4, 64, 2, 1
        args.models = args.models[:1] + args.models[-1:]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --device cpu --quick for a smoke test")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {name} | torch {torch.__version__} | timm {timm.__version__} | batch {args.batch}, "
        f"{args.img_size}px, AMP {args.amp}, channels-last"
    )
    rows = [r for m in args.models for r in bench_model(m, device, args)]
    dsm = check_fused_dsm(device, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, rows=rows, fused_dsm=dsm), fh, indent=1)
    return 0 if dsm["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
