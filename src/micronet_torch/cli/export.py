"""``micronet export``: a deploy-mode export to a runtime's format with a printed parity check (``runtime.export``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from .common import CLIError, positive_int

# flag defaults without importing torch for `micronet --help` (the runtime package does; tests check they agree);
# --format is checked against runtime.TARGETS when the command runs, so a new target needs no edit here
DEFAULT_OPSET = 18
INT8_FORMATS = ("qdq", "qoperator")


def _loaded(args: argparse.Namespace) -> Any:
    """The model to export: from ``--checkpoint`` (any supported file), else ``--model`` with random weights."""
    from ..deploy.qat import with_qat
    from ..models import LoadedModel, build_model, load_model, published_data_config  # heavy: torch

    if args.checkpoint is not None:
        loaded = with_qat(load_model(args.checkpoint, args.model, args.img_size, num_classes=args.num_classes), True)
        if args.in_chans and args.in_chans != loaded.data_config.in_chans:
            raise ValueError(f"--in-chans {args.in_chans}: {args.checkpoint} takes {loaded.data_config.in_chans}")
        return loaded
    if not args.model:
        raise ValueError("give --model (the checkpoint does not name its model)")
    in_chans = args.in_chans or 3
    model = build_model(args.model, num_classes=args.num_classes or 1000, in_chans=in_chans).eval()
    return LoadedModel(model, args.model, published_data_config(args.img_size, in_chans), [], "name")


def run_export(args: argparse.Namespace) -> int:
    from ..runtime import TARGETS, ExportOptions, export_checked  # heavy: torch and the converters

    options = ExportOptions(
        format=args.format,
        deploy=not args.no_deploy,
        fused_ops=args.fused_ops,
        opset=args.opset,
        exporter=args.exporter,
        simplify=not args.no_slim,
        int8=args.int8,
        calib=args.calib,
        calib_count=args.calib_count,
        int8_format=args.int8_format,
        per_channel=not args.per_tensor,
        float_convs=args.float_convs,
        skip_bad_images=args.skip_bad_images,
        keep_failed=args.keep_failed,
        dynamic_batch=args.dynamic_batch,
        overwrite=args.overwrite,
    )
    options.validate()  # before the (slow) model load
    if os.path.isdir(args.output):  # False for a name too long to stat: refused with its reason by the export
        example = Path(args.output) / f"{args.model or 'model'}{TARGETS[args.format].suffix}"
        raise CLIError(f"--output {args.output} is a folder: give the file to write, e.g. {example}")
    report = export_checked(_loaded(args), args.output, options)
    for line in report.lines:
        print(line)
    return 0 if report.ok else 1


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX / TorchScript / torch.export / OpenVINO / ExecuTorch / LiteRT / ncnn, with a parity check",
        description="Export a MicroNet in deploy mode (BN folded, shuffles folded, fused Dynamic Shift-Max; the "
        "portable gather-free form for openvino, executorch, tflite and ncnn), then check it against PyTorch. "
        "ONNX, TorchScript and torch.export files have a dynamic batch axis; the others a fixed input shape.",
    )
    p.add_argument("--model", help="model name (micronet models); optional with a training checkpoint")
    p.add_argument(
        "--checkpoint",
        "-c",
        help="weights: best.pt/last.pt, published .pth(.tar), PaddleClas .pdparams, .safetensors",
    )
    p.add_argument(
        "--format",
        default="onnx",
        help="onnx [default], torchscript, exported-program, openvino, executorch, tflite, tflm (fully int8 for "
        "microcontrollers; also --format tflite --int8), ncnn (runtime.TARGETS)",
    )
    p.add_argument(
        "--output", "-o", required=True, help="file to write (.onnx, .ts/.pt, .pt2, .xml, .pte, .tflite, .param)"
    )
    p.add_argument("--img-size", type=positive_int, help="input size [checkpoint's, else 224]")
    p.add_argument("--num-classes", type=positive_int, help="classes [checkpoint's, else 1000]")
    p.add_argument("--in-chans", type=positive_int, help="input channels [checkpoint's, else 3]")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, help=f"ONNX opset [{DEFAULT_OPSET}]")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto", help="ONNX exporter [auto]")
    p.add_argument("--no-slim", action="store_true", help="skip onnxslim")
    p.add_argument("--no-deploy", action="store_true", help="export the eager model as it is (for comparison)")
    p.add_argument(
        "--fused-ops",
        action="store_true",
        help="each Dynamic Shift-Max as one micronet.ShiftMax operator, for --format onnx (ONNX Runtime sessions "
        "need the library from micronet_torch.fused_ops), openvino (a Core needs the extension the export names) or "
        "executorch (micronet::shift_max kernel, loaded before the program); faster; built with the system C / C++ "
        "compiler on first use",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also quantize (ONNX Runtime static int8); with --format tflite: the fully int8 tflm file",
    )
    p.add_argument(
        "--calib", help="calibration images: an image folder (its train/ subfolder when it has one), or fashion-mnist"
    )
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable calibration images (named)")
    p.add_argument(
        "--keep-failed", action="store_true", help="keep an int8 file that fails its check, as OUTPUT-FAILED.onnx"
    )
    p.add_argument("--calib-count", type=positive_int, default=512, help="images used to calibrate [512]")
    p.add_argument("--int8-format", choices=INT8_FORMATS, default="qdq", help="ORT quantization format [qdq]")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    p.add_argument(
        "--float-convs", type=positive_int, default=0, help="keep the first N convs and the head linears in float [0]"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files at the output that this format's export did not write (refused otherwise)",
    )
    p.add_argument("--dynamic-batch", action="store_true", help="openvino: keep the batch axis dynamic (slower)")
    p.set_defaults(func=run_export)
