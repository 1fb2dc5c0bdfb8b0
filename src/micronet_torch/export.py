"""Export a MicroNet (deploy mode by default) to ONNX, TorchScript or a torch.export program; int8 via ORT.

Every export has a dynamic batch axis and is checked against PyTorch before the command returns:
fp32 max|diff| <= 1e-4 * max|logits|, int8 top-1 agreement on the calibration images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .fused_ops import FusedOpsUnavailable, library_path, onnx_translation_table, uses_fused_ops
from .fused_ops import register as register_fused_ops

FORMATS = ("onnx", "torchscript", "exported-program")
INT8_FORMATS = ("qdq", "qoperator")
FP32_TOLERANCE = 1e-4  # relative to max|logits|
INT8_MIN_AGREEMENT = 0.99
DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    """What an export produced and how it was checked."""

    path: Path
    format: str
    exporter: str = ""
    nodes: int | None = None  # ONNX nodes in the written file
    nodes_before_slim: int | None = None
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    agreement: float | None = None  # int8 top-1 agreement with fp32 PyTorch
    n_checked: int = 0
    notes: list[str] = field(default_factory=list)


# ---- models and inputs ----------------------------------------------------------------------------
def load_model(
    name: str | None, checkpoint: str | os.PathLike | None, num_classes: int | None = None, in_chans: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """An eval-mode MicroNet from a name and/or a checkpoint, with the checkpoint's metadata."""
    from .registry import create_model

    meta: dict[str, Any] = {}
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist")
        if Path(checkpoint).suffix in (".pt", ".pth", ".tar") or str(checkpoint).endswith(".pth.tar"):
            obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                meta = {k: v for k, v in obj.items() if k not in ("model", "state_dict", "optimizer", "model_ema")}
        name = name or meta.get("model_name")
        num_classes = num_classes or meta.get("num_classes") or 1000
        in_chans = in_chans or meta.get("in_chans") or 3
    if not name:
        raise ValueError("give --model (the checkpoint does not name its model)")
    model = create_model(name, pretrained=checkpoint, num_classes=num_classes or 1000, in_chans=in_chans or 3)
    return model.eval(), meta


def data_config_for(meta: dict[str, Any], img_size: int | None, in_chans: int):
    """The evaluation transform: the checkpoint's when it records one, else ImageNet's at ``img_size``."""
    from .data import DataConfig, default_policy

    if "data_config" in meta:
        cfg = DataConfig.from_dict(meta["data_config"])
        if img_size and img_size != cfg.img_size:
            cfg.img_size, cfg.policy = img_size, default_policy(img_size)
        return cfg
    size = img_size or int(meta.get("img_size", 224))
    return DataConfig(img_size=size, in_chans=in_chans, policy=default_policy(size))


def calibration_images(calib: str, cfg: Any, limit: int | None = None, split: str = "val") -> tuple[torch.Tensor, str]:
    """Normalised float images (N, C, H, W) from an image folder or ``fashion-mnist`` (its ``split``)."""
    from .data import eval_pixels, load_builtin, normalize, open_image, resize_uint8

    if calib == "fashion-mnist":
        data = load_builtin("fashion-mnist", None, download=False)
        x = data[split][0]
        if limit:
            x = x[:limit]
        x = resize_uint8(x, cfg.img_size)
        what = f"Fashion-MNIST {'test' if split == 'val' else 'training'} images"
    else:
        root = Path(calib)
        if not root.is_dir():
            raise FileNotFoundError(f"calibration folder {calib!r} does not exist (give a folder or fashion-mnist)")
        from .data import IMG_EXTENSIONS

        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise ValueError(f"no images under {calib!r}")
        files = files[:limit] if limit else files
        chans = 1 if cfg.in_chans == 1 else 3
        x = torch.stack([eval_pixels(open_image(p, chans), cfg) for p in files])
        what = f"images of {calib}"
    out = torch.cat([normalize(x[i : i + 1024], cfg) for i in range(0, len(x), 1024)])
    return out, f"{len(out)} {what}"


def synthetic_images(n: int, in_chans: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise, roughly unit variance) for calibration without data."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, in_chans, max(2, img_size // 16), max(2, img_size // 16), generator=g)
    x = nn.functional.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x + 0.25 * torch.randn(x.shape, generator=g)


# ---- exporters ------------------------------------------------------------------------------------
def _example(input_shape: tuple[int, ...]) -> torch.Tensor:
    """An example input with batch 2: batch 1 would let torch.export specialise the batch axis to 1."""
    return torch.randn(max(2, input_shape[0]), *input_shape[1:])


def _warm(model: nn.Module, example: torch.Tensor) -> None:
    """Run the model once before tracing: deploy modules build their per-input-size constants (border maps,
    row-folded weights) on first use, and a tracer would otherwise record that arithmetic instead of constants.
    Skipped in training mode, where a forward pass would move BatchNorm's running statistics."""
    if not model.training:
        with torch.no_grad():
            model(example)


def count_nodes(path: str | os.PathLike) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _onnx_dynamo(model: nn.Module, path: Path, example: torch.Tensor, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
            optimize=True,
            custom_translation_table=onnx_translation_table(),
        )
        prog.save(str(path), external_data=False)


def _onnx_legacy(model: nn.Module, path: Path, example: torch.Tensor, opset: int) -> None:
    if any(getattr(m, "fused_op", False) for m in model.modules()):
        raise RuntimeError("the micronet.ShiftMax operator (--fused-ops) needs the dynamo exporter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(path),
            dynamo=False,
            opset_version=min(opset, 17),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, int, int, int],
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    simplify: bool = True,
) -> ExportResult:
    """ONNX with a dynamic batch axis: the dynamo exporter, the legacy one if it fails (``exporter='auto'``).

    ``simplify`` runs onnxslim and keeps its result only when it has fewer nodes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(input_shape)
    _warm(model, example)
    result = ExportResult(path, "onnx")
    order = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    errors = []
    for name in order:
        try:
            (_onnx_dynamo if name == "dynamo" else _onnx_legacy)(model, path, example, opset)
            result.exporter = name
            break
        except Exception as err:
            errors.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    else:
        raise RuntimeError("ONNX export failed: " + "; ".join(errors))
    if errors:
        result.notes.append("fell back to the legacy exporter (" + errors[0] + ")")
    result.nodes = result.nodes_before_slim = count_nodes(path)
    if simplify:
        result.nodes = _slim(path, result)
    return result


def _slim(path: Path, result: ExportResult) -> int:
    try:
        import onnxslim
    except ImportError:
        result.notes.append("onnxslim not installed: graph not simplified")
        return count_nodes(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "slim.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                onnxslim.slim(str(path), str(out))
            except Exception as err:
                result.notes.append(f"onnxslim failed ({type(err).__name__}); graph kept as exported")
                return count_nodes(path)
        slim_nodes = count_nodes(out)
        if slim_nodes < count_nodes(path):
            os.replace(out, path)
            result.notes.append(f"onnxslim: {result.nodes_before_slim} -> {slim_nodes} nodes")
            return slim_nodes
    return count_nodes(path)


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> ExportResult:
    """TorchScript by tracing (the deploy graph has no data-dependent control flow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(*input_shape)
    _warm(model, example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
    traced.save(str(path))
    return ExportResult(path, "torchscript", exporter="torch.jit.trace")


def export_program(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...]) -> ExportResult:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch axis; load with ``torch.export.load``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = _example(input_shape)
    _warm(model, example)
    with torch.no_grad():
        prog = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(prog, str(path))
    return ExportResult(path, "exported-program", exporter="torch.export")


# ---- ONNX Runtime ---------------------------------------------------------------------------------
def _session_options(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """CPU session options: ``threads`` intra-op threads, all graph optimizations (or none), and the
    ``micronet`` operator library when the file uses it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if uses_fused_ops(path):
        register_fused_ops(so)
    return so


def ort_session(path: str | os.PathLike, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and all graph optimizations."""
    import onnxruntime as ort

    so = _session_options(path, threads, optimize)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_nodes_after_optimization(path: str | os.PathLike) -> int:
    """Node count of the graph ONNX Runtime actually runs (after its own fusions, ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        so = _session_options(path)
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return count_nodes(out)


def run_ort(session: Any, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Run a session over ``x`` in chunks; returns the stacked first output."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i : i + batch].numpy()})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


class _Reader:
    """ONNX Runtime calibration data reader over a float tensor, a few images per call."""

    def __init__(self, name: str, x: torch.Tensor, batch: int = 16) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i : self.i + self.batch].numpy()}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def quantize_onnx(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calib: torch.Tensor,
    fmt: str = "qdq",
    per_channel: bool = True,
    op_types: tuple[str, ...] | None = ("Conv", "Gemm"),
    float_convs: int = 0,
) -> Path:
    """Static int8 quantization (ORT ``quantize_static``, MinMax calibration over ``calib``).

    ``op_types`` limits quantization to the convolutions and linears by default: Dynamic Shift-Max's
    products stay in float, which keeps its input-dependent coefficients exact. ``float_convs`` keeps the
    first that many convolution layers (graph order; the Conv nodes of one ``RowFoldedConv`` share their
    input and count once) and, when it is > 0, the two head linears in float: the
    early, high-resolution layers are the ones whose 8-bit rounding flips predictions (``docs/deploy.md``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fmt not in INT8_FORMATS:
        raise ValueError(f"unknown int8 format {fmt!r}; choose one of {INT8_FORMATS}")
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            except Exception:
                pre = Path(fp32_path)
        name = ort_session(pre, optimize=False).get_inputs()[0].name
        exclude: list[str] = []
        if float_convs > 0:
            import onnx

            graph = onnx.load(str(pre)).graph
            layers: dict[str, int] = {}  # a row-folded conv's m Conv nodes read one input: one layer
            for n in graph.node:
                if n.op_type == "Conv":
                    layer = layers.setdefault(n.input[0], len(layers))
                    if layer < float_convs:
                        exclude.append(n.name)
            exclude += [n.name for n in graph.node if n.op_type == "Gemm"][-2:]
        quantize_static(
            str(pre),
            str(int8_path),
            _Reader(name, calib),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=exclude,
        )
    return int8_path


# ---- parity -----------------------------------------------------------------------------------------
@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def load_exported(path: str | os.PathLike, fmt: str) -> Any:
    """A callable running an exported file on a float tensor (returns a numpy array)."""
    if fmt == "onnx":
        sess = ort_session(path)
        return lambda x: run_ort(sess, x)
    if fmt == "torchscript":
        mod = torch.jit.load(str(path))
        return lambda x: mod(x).detach().numpy()
    prog = torch.export.load(str(path)).module()
    return lambda x: prog(x).detach().numpy()


def check_fp32(result: ExportResult, model: nn.Module, x: torch.Tensor) -> ExportResult:
    """max|exported - PyTorch| relative to max|PyTorch logits| over ``x``."""
    ref = reference_logits(model, x).numpy()
    out = load_exported(result.path, result.format)(x)
    result.max_abs_diff = float(np.abs(out - ref).max())
    result.rel_diff = result.max_abs_diff / max(float(np.abs(ref).max()), 1e-12)
    result.n_checked = len(x)
    return result


def check_int8(result: ExportResult, model: nn.Module, x: torch.Tensor) -> ExportResult:
    """Top-1 agreement of the int8 ONNX model with fp32 PyTorch over ``x``."""
    ref = reference_logits(model, x).numpy().argmax(1)
    out = run_ort(ort_session(result.path), x).argmax(1)
    result.agreement = float((out == ref).mean())
    result.n_checked = len(x)
    return result


# ---- the command ------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    from .cli import CLIError
    from .deploy import convert_to_deploy

    if args.int8 and args.format != "onnx":
        raise CLIError("--int8 needs --format onnx (quantization runs in ONNX Runtime)")
    if args.int8 and not args.calib:
        raise CLIError("--int8 needs --calib DIR (an image folder, or fashion-mnist)")
    if args.fused_ops:
        clash = [
            flag
            for flag, on in (
                ("--format " + args.format, args.format != "onnx"),
                ("--no-deploy", args.no_deploy),
                ("--int8", args.int8),
                ("--exporter legacy", args.exporter == "legacy"),
            )
            if on
        ]
        if clash:
            raise CLIError(
                f"--fused-ops writes an fp32 ONNX deploy graph through the dynamo exporter; drop {', '.join(clash)}"
            )
        try:
            library = library_path()
        except FusedOpsUnavailable as err:
            raise CLIError(str(err)) from err
    model, meta = load_model(args.model, args.checkpoint, args.num_classes, args.in_chans)
    in_chans = getattr(model, "in_chans", 3)
    cfg = data_config_for(meta, args.img_size, in_chans)
    shape = (1, in_chans, cfg.img_size, cfg.img_size)
    backend = "onnx" if args.format == "onnx" else "eager"
    target = model if args.no_deploy else convert_to_deploy(model, backend=backend, fused_ops=args.fused_ops)
    t0 = time.perf_counter()
    out = Path(args.output)
    if args.format == "onnx":
        fp32_path = out.with_name(out.stem + "-fp32.onnx") if args.int8 else out
        res = export_onnx(target, fp32_path, shape, args.opset, args.exporter, simplify=not args.no_slim)
    elif args.format == "torchscript":
        res = export_torchscript(target, out, shape)
    else:
        res = export_program(target, out, shape)
    print(
        f"exported {args.model or meta.get('model_name')} ({'eager' if args.no_deploy else 'deploy mode'}) "
        f"to {res.path} [{res.format}, {res.exporter}, {time.perf_counter() - t0:.1f} s]"
        + (f", {res.nodes} ONNX nodes" if res.nodes else "")
    )
    for note in res.notes:
        print(f"  note: {note}")
    if args.fused_ops:
        print(
            f"  note: uses the micronet.ShiftMax operator; ONNX Runtime sessions need "
            f"SessionOptions.register_custom_ops_library('{library}') (micronet_torch.fused_ops.register)"
        )
    # fp32 parity on a few inputs with batch > 1 (checks the dynamic batch axis as well)
    check_x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(0))
    check_fp32(res, model, check_x)
    ok = res.rel_diff <= FP32_TOLERANCE
    print(
        f"parity vs PyTorch (fp32, batch 3): max|diff| = {res.max_abs_diff:.3g} = {res.rel_diff:.2e} x max|logits| "
        f"(limit {FP32_TOLERANCE:g}) {'OK' if ok else 'FAIL'}"
    )
    if not ok:
        return 1
    if args.int8:
        calib_x, what = calibration_images(args.calib, cfg, args.calib_count, split="train")
        check_x, check_what = calibration_images(args.calib, cfg, None, split="val")
        if args.calib != "fashion-mnist":
            check_what = what + " (the calibration images)"
        quantize_onnx(
            res.path, out, calib_x, args.int8_format, per_channel=not args.per_tensor, float_convs=args.float_convs
        )
        q = check_int8(ExportResult(out, "onnx", exporter=f"ORT quantize_static {args.int8_format}"), model, check_x)
        ok = q.agreement >= INT8_MIN_AGREEMENT
        scales = "per-tensor" if args.per_tensor else "per-channel"
        if args.float_convs:
            scales += f", first {args.float_convs} convs and the head linears in float"
        print(f"int8 ({args.int8_format}, {scales}) calibrated on {what}: {out}")
        print(
            f"top-1 agreement int8 vs fp32 PyTorch on {check_what}: {q.agreement * 100:.2f} % "
            f"(limit {INT8_MIN_AGREEMENT * 100:.0f} %) {'OK' if ok else 'FAIL'}"
        )
        if not ok:
            return 1
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export to ONNX / TorchScript / torch.export (deploy mode, int8), with a parity check",
        description="Export a MicroNet in deploy mode (BN folded, shuffles folded, fused Dynamic Shift-Max) with a "
        "dynamic batch axis, then check it against PyTorch.",
    )
    p.add_argument("--model", help="model name (micronet models); optional with a training checkpoint")
    p.add_argument("--checkpoint", help="weights: published .pth, PaddleClas .pdparams, our .pt/.safetensors")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", "-o", required=True, help="file to write (.onnx, .ts/.pt, .pt2)")
    p.add_argument("--img-size", type=int, help="input size [checkpoint's, else 224]")
    p.add_argument("--num-classes", type=int, help="classes [checkpoint's, else 1000]")
    p.add_argument("--in-chans", type=int, help="input channels [checkpoint's, else 3]")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset [{DEFAULT_OPSET}]")
    p.add_argument("--exporter", choices=("auto", "dynamo", "legacy"), default="auto", help="ONNX exporter [auto]")
    p.add_argument("--no-slim", action="store_true", help="skip onnxslim")
    p.add_argument("--no-deploy", action="store_true", help="export the eager model as it is (for comparison)")
    p.add_argument(
        "--fused-ops",
        action="store_true",
        help="each Dynamic Shift-Max as one micronet.ShiftMax operator (faster; sessions need the library from "
        "micronet_torch.fused_ops, built with the system C compiler on first use)",
    )
    p.add_argument("--int8", action="store_true", help="also quantize (ONNX Runtime static int8); writes OUTPUT")
    p.add_argument("--calib", help="calibration images: an image folder, or fashion-mnist")
    p.add_argument("--calib-count", type=int, default=512, help="images used to calibrate [512]")
    p.add_argument("--int8-format", choices=INT8_FORMATS, default="qdq", help="ORT quantization format [qdq]")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per-channel)")
    p.add_argument(
        "--float-convs", type=int, default=0, help="keep the first N convs and the head linears in float [0]"
    )
    p.set_defaults(func=run_export)
