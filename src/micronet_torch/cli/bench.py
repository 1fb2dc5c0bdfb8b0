"""``micronet bench``: CPU latency and throughput tables (``tools.bench``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..tools.bench_report import ALL_RUNTIMES, DEFAULT_MODELS, MCU_SIZES, PATHS
from .common import CLIError, nonnegative_int, positive_float, positive_int

DEFAULT_PATHS = PATHS
# the benchmarks (torch, timm, every runtime) are imported inside the functions that run them: the parser is
# built from the names in ``tools.bench_report`` alone


def run_bench_runtimes(args: argparse.Namespace, log: Callable[[str], None]) -> int:
    """``--runtimes``: one table per deployment runtime (1 thread, batch 1) instead of the ``--paths`` tables."""
    from ..tools.bench_runtimes import markdown_runtimes, parse_runtimes, run_runtime_benchmark, save_runtimes

    records, env = run_runtime_benchmark(
        models=tuple(args.models),
        runtimes=parse_runtimes(args.runtimes),
        runs=args.runs,
        warmup=args.warmup,
        img_size=args.img_size,
        log=log,
        out_dir=args.out_dir,
        max_seconds=args.max_seconds,
        block=args.block,
        floors=args.floors,
    )
    payload, table = dict(environment=env, records=[asdict(r) for r in records]), markdown_runtimes(records, env)
    return _report(args, log, lambda: save_runtimes(records, env, args.out_dir), payload, table)


def run_bench(args: argparse.Namespace) -> int:
    from ..data import DataConfig, default_policy
    from ..runtime import calibration_images
    from ..tools.bench import environment, run_benchmark
    from ..tools.bench_report import check_out_dir, environment_line, markdown, save

    if args.floors and not args.runtimes:
        raise CLIError("--floors times deployment runtimes: give --runtimes too (e.g. --runtimes ort,openvino)")
    check_out_dir(
        args.out_dir, "bench-mcu" if args.mcu else "bench-runtimes" if args.runtimes else "bench", args.overwrite
    )
    calib = None
    if args.calib:
        cfg = DataConfig(img_size=args.img_size, in_chans=3, policy=default_policy(args.img_size))
        calib, _ = calibration_images(args.calib, cfg, limit=64, split="train")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    env0 = environment()
    log(environment_line(env0))
    if args.mcu:  # fully int8 TFLM files: flash, arena, reference-kernel latency (tools/bench_mcu.py)
        from ..tools.bench_mcu import run_bench_mcu  # heavy: torch, the quantizer, TFLM

        return run_bench_mcu(args, log, _report)
    if args.runtimes:
        return run_bench_runtimes(args, log)
    records, env = run_benchmark(
        models=tuple(args.models),
        paths=tuple(args.paths),
        runs=args.runs,
        warmup=args.warmup,
        img_size=args.img_size,
        threads=args.threads,
        batch=args.batch,
        calib=calib,
        log=log,
        out_dir=args.out_dir,
        max_seconds=args.max_seconds,
        block=args.block,
    )
    table = markdown(records, env, show_targets=args.targets)
    return _report(args, log, lambda: save(records, env, args.out_dir), [asdict(r) for r in records], table)


def _report(
    args: argparse.Namespace, log: Callable[[str], None], save_files: Callable, payload: Any, table: str
) -> int:
    """What both benchmarks end with: the files saved (with ``--out-dir``), then JSON or the Markdown tables."""
    if args.out_dir:
        js, md = save_files()
        log(f"saved {js} and {md}")
    print(json.dumps(payload, indent=1) if args.json else table)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="CPU latency/throughput: eager, deploy, ONNX Runtime fp32 and int8, vs MobileNetV3",
        description="Median latency (batch 1; one thread and all threads) and batch throughput of MicroNet and "
        "timm baselines through eager PyTorch, deploy mode, ONNX Runtime fp32 and int8.",
    )
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to run [M0-M3 + timm baselines]")
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS, help="inference paths [all]")
    p.add_argument(
        "--runtimes",
        help=f"comma-separated deployment runtimes ({','.join(ALL_RUNTIMES)}): one table each, 1 thread, batch 1, "
        "every model exported as micronet export does (replaces the --paths tables); -ops: MicroNet exported with "
        "--fused-ops",
    )
    p.add_argument(
        "--floors",
        action="store_true",
        help="with --runtimes: also time each MicroNet with every Dynamic Shift-Max replaced by ReLU (+relu) and "
        "without its shift term (+noshift), in the same deploy graph: the least a cheaper operator could reach",
    )
    p.add_argument(
        "--mcu",
        action="store_true",
        help="fully int8 TFLM files instead of the latency tables: flash, TFLM arena (activations + fixed), ops, "
        "tensors, reference-kernel latency on this host (models interleaved), int8 agreement (needs [mcu])",
    )
    p.add_argument("--mcu-sizes", default=",".join(map(str, MCU_SIZES)), help="--mcu input sizes [%(default)s]")
    p.add_argument("--mcu-classes", type=positive_int, default=10, help="--mcu classifier classes [10]")
    p.add_argument(
        "--mcu-coefficients",
        choices=("matmul", "conv", "linear"),
        default="matmul",
        help="--mcu: MicroNet's Dynamic Shift-Max coefficient layers as BATCH_MATMUL with per-tensor weights, as "
        "1 x 1 convs (a larger arena), or as FULLY_CONNECTED (TFLM rounds them unlike LiteRT; docs/mcu.md) [matmul]",
    )
    p.add_argument(
        "--mcu-stem",
        choices=("separable", "merged"),
        default="separable",
        help="--mcu: MicroNet's stem as its two factorized convs (the normalization folded into the first) or merged "
        "into one 3 x 3 conv (slower in TFLM's reference kernels; docs/mcu.md) [separable]",
    )
    p.add_argument(
        "--mcu-merge",
        choices=("all", "none"),
        default="all",
        help="--mcu: the blocks' factorized k x 1 / 1 x k depthwise pairs merged into one k x k conv (fewer ops, a "
        "border-correction add each) or kept as two [all]",
    )
    p.add_argument("--runs", type=positive_int, default=50, help="timed runs per measurement [50]")
    p.add_argument("--warmup", type=nonnegative_int, default=10, help="warm-up runs [10]")
    p.add_argument("--img-size", type=positive_int, default=224, help="input size [224]")
    p.add_argument("--threads", type=positive_int, help="'all threads' setting [os.cpu_count()]")
    p.add_argument("--batch", type=positive_int, default=32, help="throughput batch size (1 skips it) [32]")
    p.add_argument("--calib", help="int8 calibration images (folder or fashion-mnist) [synthetic]")
    p.add_argument(
        "--block",
        type=positive_int,
        default=10,
        help="batch-1 calls of one job per turn, the first untimed (steady-state latency; 1 = strict alternation) [10]",
    )
    p.add_argument(
        "--max-seconds", type=positive_float, default=600.0, help="cap on the timed rounds of one setting [600]"
    )
    p.add_argument("--out-dir", help="save bench.json and bench.md here (bench-runtimes.* with --runtimes)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out-dir")
    p.add_argument("--json", action="store_true", help="print the records as JSON (progress goes to stderr)")
    p.add_argument("--targets", action="store_true", help="also print the project's speed targets (for its docs)")
    p.set_defaults(func=run_bench)
