"""Scratch: per-runtime interleaved latency of MicroNet's portable form against MobileNetV3-Small.

    PYTHONPATH=src python benchmarks/runtimes_scratch.py --runtimes ort,openvino --pairs m0 --runs 200
Each model is exported to the runtime at 1x3x224x224, loaded with one thread, checked for parity against
the eager model, then timed in turns with the other models of the same runtime (bench.time_round_robin).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from micronet_torch.bench import build_model, time_round_robin, trained_like

from micronet_torch.deploy import convert_to_deploy
from micronet_torch.deploy_portable import convert_to_portable

PAIRS = {"m0": ("micronet_m0", "mobilenetv3_small_050"), "m3": ("micronet_m3", "mobilenetv3_small_100")}


def _ort(model: torch.nn.Module, path: Path, shape: tuple[int, ...], meta: dict) -> Path:
    from micronet_torch.export import export_onnx

    export_onnx(model, path.with_suffix(".onnx"), shape)
    return path.with_suffix(".onnx")


def _ort_load(path: Path, threads: int = 1):
    from micronet_torch.export import ort_session

    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def exporter(rt: str):
    if rt == "ort":
        return _ort, _ort_load
    mod = importlib.import_module(f"micronet_torch.runtime.{rt}")
    return getattr(mod, f"export_{rt}"), getattr(mod, f"load_{rt}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtimes", default="ort,openvino,executorch,litert,ncnn")
    ap.add_argument("--pairs", default="m0,m3")
    ap.add_argument("--form", default="portable", help="portable | deploy (the existing eager deploy form)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--out", default="/tmp/rt_bench")
    ap.add_argument("--variants", default="", help="portable options to time side by side: 'merge=all/expand=16'")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = (1, 3, 224, 224)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    models = {}
    for pair in args.pairs.split(","):
        for name in PAIRS[pair]:
            eager = trained_like(build_model(name))
            if name.startswith("micronet"):
                form = convert_to_portable(eager) if args.form == "portable" else convert_to_deploy(eager)
            else:
                form = eager
            models[name] = (eager, form)
            if name.startswith("micronet"):
                for v in filter(None, args.variants.split("/")):
                    kw = {k: (int(val) if val.isdigit() else val) for k, val in (p.split("=") for p in v.split(","))}
                    models[f"{name}[{v}]"] = (eager, convert_to_portable(eager, **kw))
    results = {}
    for rt in args.runtimes.split(","):
        export, load = exporter(rt)
        jobs, info = {}, {}
        for name, (eager, form) in models.items():
            t0 = time.time()
            fname = name.replace("[", "_").replace("]", "").replace("=", "").replace(",", "_").replace("/", "_")
            path = export(form, Path(args.out) / rt / fname, shape, {"model": name})
            run = load(path, 1)
            with torch.no_grad():
                ref = eager(x).numpy()
            err = float(np.abs(run(x.numpy()) - ref).max() / np.abs(ref).max())
            info[name] = {"export_s": round(time.time() - t0, 1), "parity": err}
            xn = x.numpy()
            jobs[(name, rt)] = lambda run=run, xn=xn: run(xn)
        times = time_round_robin(jobs, args.runs, warmup=20, max_seconds=args.seconds, block=5)
        for (name, _), ts in times.items():
            info[name]["ms"] = round(statistics.median(ts) * 1e3, 4)
        for pair in args.pairs.split(","):
            a, b = PAIRS[pair]
            for key in [k for k in info if k.startswith(a)]:
                info[f"ratio {key}"] = round(info[key]["ms"] / info[b]["ms"], 3)
        results[rt] = info
        print(rt, json.dumps(info), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
