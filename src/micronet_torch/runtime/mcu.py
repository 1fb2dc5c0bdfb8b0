"""A fully int8 LiteRT file for microcontrollers (TensorFlow Lite Micro), checked in TFLM itself.

``export_mcu`` goes: the ``mcu`` deploy graph (``deploy.mcu``: the portable form with a MINIMUM-free clamp and each
shift as one gather; MobileNetV3 baselines as they are) taking NHWC camera pixels (``deploy.pixel_input``: the
normalization inside the model, folded into MicroNet's stem) -> a float ``.tflite`` (``litert_torch``) ->
Google's ai-edge-quantizer (static int8: per-channel int8 weights, per-tensor weights for the form's coefficient
layers, batched matmuls or fully connected; int8 activations, int32 biases, int8 input and output) -> the weights
moved back inside the flatbuffer (the quantizer appends the buffers of a model over 256 KiB after it, which TFLM's
loader ignores), the tensor names and the convolutions' bias scales (which no int8 kernel reads) dropped, each
constant matmul operand stored transposed (``adj_y``).

The input's quantization is fixed to scale 1, zero point -128: the board feeds ``pixel - 128`` and does no float
arithmetic. PyTorch's PT2E route through ``litert_torch`` is not used: its int8 file disagreed with the float
model (docs/mcu.md). The checks: no float tensor left, TFLM's output within one int8 step of LiteRT's, top-1
agreement with the float model on held-out images; TFLM's arena use and the flash size are measured.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._fs import atomic_write
from ..data.config import IMAGENET_MEAN, IMAGENET_STD, channel_stats
from ..deploy.mcu import fc_per_tensor, tflite_gathers
from ..deploy.pixel_input import mcu_graph
from ..deploy.qat import Int8Graph, QatNet
from .litert import export_litert
from .mcu_cpp import arena_size, write_cpp
from .metadata import read_json_beside, write_json_beside
from .native_log import captured
from .result import ConversionError, ExportResult
from .tflm import DEFAULT_ARENA, TflmRun, run_tflm
from .tflm_file import INT8, constant_matmuls_adj_y, describe, drop_conv_bias_scales, pack_for_tflm, read_model

EXTRA = "pip install micronet-torch[mcu]"
INPUT_SCALE, INPUT_ZERO_POINT = 1.0, -128  # int8 input = camera pixel - 128
MIN_STEP_AGREEMENT = 0.99  # TFLM vs LiteRT: outputs within one int8 step
RANGE_PERCENTILE = 99.5  # an activation's int8 range: this percentile of the calibration images' maxima (see below)
CHECK_COUNT = 1000  # held-out images the export runs in LiteRT and TFLM


@dataclass
class McuFile:
    """What ``export_mcu`` wrote and measured."""

    path: Path
    flash_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)  # builtin op name -> count
    tensors: int = 0
    float_tensors: list[str] = field(default_factory=list)
    input_quant: tuple[float, int] = (INPUT_SCALE, INPUT_ZERO_POINT)
    output_quant: tuple[float, int] = (1.0, 0)
    arena: dict[str, int] = field(default_factory=dict)  # TFLM: total, head (activations), tail (fixed)
    step_agreement: float | None = None  # share of outputs with |TFLM - LiteRT| <= 1 step
    max_step_diff: int | None = None
    top1_agreement: float | None = None  # int8 (TFLM) vs float PyTorch
    n_checked: int = 0
    num_classes: int = 0
    trained_ranges: int = 0  # activation tensors whose range a --qat run trained (the rest calibrated)
    notes: list[str] = field(default_factory=list)


def pixels_of(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalized NCHW images back to the NHWC 0..255 pixels they came from (rounded: they were uint8)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    p = ((x * s + m) * 255.0).round().clamp(0, 255)
    return p.permute(0, 2, 3, 1).numpy().astype(np.float32)


def float_tflite(graph: nn.Module, path: Path, shape: tuple[int, int, int, int]) -> Path:
    """The float ``.tflite`` of ``graph`` (NHWC input ``shape``) that the int8 file is quantized from."""
    with ExitStack() as stack:
        with captured():  # importing litert_torch's tables (torchao) logs a torch deprecation line on stderr
            stack.enter_context(tflite_gathers())  # the mcu form's gathers as single GATHER ops (deploy/mcu.py)
        return export_litert(graph, path, shape)


def trained_ranges(
    float_path: Path, qnet: QatNet, norm: nn.Module, pixels: np.ndarray
) -> dict[str, tuple[float, float]]:
    """The float file's activation tensors that a ``--qat`` run quantized, by name, with their trained ranges.

    The file names its tensors after the converter's graph, not the model's modules, so they are found by value:
    one image through the file (all tensors kept) and through ``norm`` (``PixelInput``'s, the file's first op) and
    ``QatNet.float_values``; a tensor equal (NHWC) to a quantization point's value takes that point's range."""
    from ai_edge_litert.interpreter import Interpreter  # optional heavy dependency

    with captured():
        interp = Interpreter(model_path=str(float_path), num_threads=1, experimental_preserve_all_tensors=True)
        interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], pixels[:1].astype(np.float32))
    interp.invoke()
    by_size: dict[int, list[tuple[str, np.ndarray]]] = {}
    for d in interp.get_tensor_details():
        if d["dtype"] != np.float32:
            continue
        try:
            v = interp.get_tensor(d["index"])
        except ValueError:  # a tensor without data
            continue
        by_size.setdefault(v.size, []).append((d["name"], v.ravel()))
    with torch.no_grad():
        x = norm(torch.from_numpy(pixels[:1].astype(np.float32)).permute(0, 3, 1, 2))
    found: dict[str, tuple[float, float]] = {}
    for value, fq in qnet.float_values(x):
        flat = (value.permute(0, 2, 3, 1) if value.dim() == 4 else value).reshape(-1).numpy()
        tol = 1e-4 * max(float(np.abs(flat).max()), 1e-6)
        for name, candidate in by_size.get(flat.size, []):
            if float(np.abs(candidate - flat).max()) <= tol:
                found[name] = (float(fq.lo), float(fq.hi))
    return found


def _collect_extremes(qsv: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The calibrator's update function: every calibration image's minimum and maximum of the tensor, kept (the
    calibrator stores the first image's values as they are, then calls this with each next image's)."""
    qsv.setdefault("mins", [qsv["min"]]).append(new["min"])
    qsv.setdefault("maxs", [qsv["max"]]).append(new["max"])
    return qsv


def _percentile_range(qsv: dict[str, Any]) -> dict[str, Any]:
    """A tensor's int8 range from its per-image extremes: their ``RANGE_PERCENTILE``-th percentile (0 inside).

    Why not the quantizer's defaults: its moving average (0.95) of each image's range, images fed one by one, ends
    on the last ~20 images and clips the rest; the minimum and maximum over all images let a few images' outliers
    set the step of every other image. Clipping the top 0.5 % of the images' extremes keeps more of the float
    model's decisions than either (docs/mcu.md has the measurement)."""
    if "mins" not in qsv:
        return qsv
    lo = np.percentile(np.stack(qsv["mins"]), 100 - RANGE_PERCENTILE, axis=0)
    hi = np.percentile(np.stack(qsv["maxs"]), RANGE_PERCENTILE, axis=0)
    dtype = np.asarray(qsv["min"]).dtype
    return {"min": np.minimum(lo, 0).astype(dtype), "max": np.maximum(hi, 0).astype(dtype)}


def int8_recipe(fc_per_tensor: bool = False) -> list[dict[str, Any]]:
    """ai-edge-quantizer's static int8 recipe (``static_wi8_ai8``: int8 activations, per-channel int8 weights), with
    ``fc_per_tensor`` FULLY_CONNECTED and BATCH_MATMUL weights per tensor: TFLM then keeps no per-channel output
    multipliers and shifts (two int32 a channel) in its arena for them. For the ``mcu`` form with linear coefficient
    layers (``deploy.mcu.fc_per_tensor``), whose ``--qat`` rounds them per tensor too (``deploy/qat.py``)."""
    try:
        from ai_edge_quantizer import qtyping, recipe_manager
    except ImportError as err:
        raise ImportError(f"the int8 LiteRT export needs ai-edge-quantizer: {EXTRA}") from err
    rules = recipe_manager.RecipeManager()
    entries = [(qtyping.TFLOperationName.ALL_SUPPORTED, qtyping.QuantGranularity.CHANNELWISE)]
    if fc_per_tensor:
        for op in (qtyping.TFLOperationName.FULLY_CONNECTED, qtyping.TFLOperationName.BATCH_MATMUL):
            entries.append((op, qtyping.QuantGranularity.TENSORWISE))
    for op, granularity in entries:
        rules.add_static_config(".*", op, activation_num_bits=8, weight_num_bits=8, weight_granularity=granularity)
    return rules.get_quantization_recipe()


def quantize_int8(
    float_path: Path,
    calib_pixels: np.ndarray,
    ranges: dict[str, tuple[float, float]] | None = None,
    fc_per_tensor: bool = False,
    keep_names: bool = False,
) -> bytes:
    """ai-edge-quantizer's static int8 recipe on the float file (``int8_recipe(fc_per_tensor)``), calibrated on
    ``calib_pixels`` (N, H, W, C) with the input range pinned to 0..255 and the tensors of ``ranges`` (a
    ``--qat`` run's, ``trained_ranges``) given theirs; returns the file's bytes with every buffer inside the
    flatbuffer and no tensor names (``keep_names``: the float file's, to inspect it)."""
    try:
        from ai_edge_litert.tools import flatbuffer_utils
        from ai_edge_quantizer import calibrator, quantizer, recipe_manager
    except ImportError as err:
        raise ImportError(f"the int8 LiteRT export needs ai-edge-quantizer: {EXTRA}") from err
    recipe = int8_recipe(fc_per_tensor)
    with captured():  # its progress report and TensorFlow's start-up lines
        qt = quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(recipe)
        fmodel = flatbuffer_utils.read_model(str(float_path))
        sig = fmodel.signatureDefs[0]
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        in_name = sig.inputs[0].name
        in_name = in_name.decode() if isinstance(in_name, bytes) else in_name
        data = [{in_name: calib_pixels[i : i + 1]} for i in range(len(calib_pixels))]
        rules = recipe_manager.RecipeManager()
        rules.load_quantization_recipe(recipe)
        calib = calibrator.Calibrator(str(float_path), num_threads=1, qsv_update_func=_collect_extremes)
        calib.calibrate({key: data}, rules)
        qsvs = {name: _percentile_range(qsv) for name, qsv in calib.get_model_qsvs().items()}
        sub = fmodel.subgraphs[0]
        tname = sub.tensors[sub.inputs[0]].name
        tname = tname.decode() if isinstance(tname, bytes) else tname
        # scale 1, zero point -128 exactly: the pixel range, whatever the calibration images held
        qsvs[tname] = {"min": np.zeros_like(qsvs[tname]["min"]), "max": np.full_like(qsvs[tname]["max"], 255.0)}
        for name, (lo, hi) in (ranges or {}).items():
            if name in qsvs and name != tname:
                qsvs[name] = {"min": np.full_like(qsvs[name]["min"], lo), "max": np.full_like(qsvs[name]["max"], hi)}
        quantized = qt.quantize(qsvs, enable_progress_report=False).quantized_model
    model = read_model(quantized)  # resolves buffers stored after the flatbuffer into the model
    if not keep_names:
        flatbuffer_utils.strip_strings(model)
    drop_conv_bias_scales(model)
    constant_matmuls_adj_y(model)
    return pack_for_tflm(model)


def run_litert_int8(path: Path, q_inputs: np.ndarray) -> np.ndarray:
    """The int8 file in LiteRT's reference kernels (``BUILTIN_REF``: the arithmetic TFLM's kernels share; XNNPACK's
    int8 kernels round differently, up to several steps on MicroNet), image by image: int8 in, int8 out."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # optional heavy dependency

    with captured():
        ref = OpResolverType.BUILTIN_REF
        interp = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=ref)
        interp.allocate_tensors()
    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]
    outs = []
    for x in q_inputs:
        interp.set_tensor(inp, x[None])
        interp.invoke()
        outs.append(interp.get_tensor(out).copy())
    return np.concatenate(outs)


def pixel_stats(meta: dict[str, str], chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a file's metadata records (ImageNet's without), for ``chans`` channels as the image pipeline
    applied them (``channel_stats``: a 3-value mean averaged for greyscale), so the pixels are the ones it saw."""
    mean = json.loads(meta["mean"]) if "mean" in meta else IMAGENET_MEAN
    std = json.loads(meta["std"]) if "std" in meta else IMAGENET_STD
    return tuple(channel_stats(mean, chans)), tuple(channel_stats(std, chans))


def quantize_pixels(pixels: np.ndarray) -> np.ndarray:
    """Camera pixels as the file's int8 input: ``pixel - 128``."""
    return (np.round(pixels) + INPUT_ZERO_POINT).astype(np.int8)


def export_mcu(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    calib_pixels: np.ndarray,
    check_pixels: np.ndarray,
    arena_size: int = DEFAULT_ARENA,
    log: Callable[[str], None] = lambda s: None,
    **options: Any,
) -> McuFile:
    """Write the fully int8 ``.tflite`` for ``model`` at ``img_size`` and check it (see the module docstring).

    ``calib_pixels`` / ``check_pixels``: (N, H, W, C) float arrays of 0..255 pixels. The file is written (atomically)
    whatever the checks say; the returned ``McuFile`` holds their figures.
    """
    path = Path(path).with_suffix(".tflite")
    in_chans = len(mean)
    graph = mcu_graph(model, mean, std, **options)
    ranges: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="micronet-mcu-") as tmp:
        float_path = float_tflite(graph, Path(tmp) / "float.tflite", (1, img_size, img_size, in_chans))
        if isinstance(model, Int8Graph):  # a --qat checkpoint: its trained ranges
            ranges = trained_ranges(float_path, model.qat_net, graph.norm, calib_pixels)
        data = quantize_int8(float_path, calib_pixels, ranges, fc_per_tensor(graph))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))
    info = describe(data)
    res = McuFile(path, len(data), info["ops"], info["tensors"], info["float_tensors"])
    res.trained_ranges = len(ranges)
    res.input_quant, res.output_quant = info["input_quant"], info["output_quant"]
    if info["misaligned_buffers"]:
        res.notes.append(f"{info['misaligned_buffers']} buffers not 16-byte aligned")
    if info["input_type"] != INT8 or info["output_type"] != INT8:
        res.float_tensors.append("input/output not int8")
    q_check = quantize_pixels(check_pixels)
    try:
        lite = run_litert_int8(path, q_check)
    except RuntimeError as err:  # e.g. a requantization scale out of range (weights far from trained ranges)
        raise ConversionError(
            f"LiteRT cannot run the int8 file {path.name} (untrained weights? export a trained checkpoint): "
            + " ".join(str(err).split())
        ) from err
    micro: TflmRun = run_tflm([path], [q_check], arena_size)
    tflm_out = micro.outputs[0].reshape(lite.shape)
    diff = np.abs(tflm_out.astype(np.int32) - lite.astype(np.int32))
    res.step_agreement = float((diff <= 1).mean())
    res.max_step_diff = int(diff.max())
    res.arena = micro.arena[0]
    with torch.no_grad():
        ref = graph(torch.from_numpy(check_pixels)).argmax(1).numpy()
    res.top1_agreement = float((tflm_out.reshape(len(ref), -1).argmax(1) == ref).mean())
    res.n_checked, res.num_classes = len(ref), int(tflm_out.reshape(len(ref), -1).shape[1])
    return res


def export_target(
    graph: nn.Module, path: Path, input_shape: tuple[int, ...], options: Any, metadata: dict[str, str] | None = None
) -> ExportResult:
    """The ``tflm`` target's converter: ``export_mcu`` on ``options.calibration`` (the calibration and check images
    ``export_checked`` read), then the C++ pair and the sidecar beside the file. Its checks come back as
    ``checks`` lines; a float tensor left or TFLM off LiteRT by more than one step is a failure."""
    meta = dict(metadata or {})
    chans, size = int(input_shape[1]), int(input_shape[-1])
    mean, std = pixel_stats(meta, chans)
    if options.calibration is None:
        raise ValueError("the tflm export needs calibration images (--calib DIR)")
    calib_x, what, check_x, check_what = options.calibration
    if len(check_x) > CHECK_COUNT:
        check_x, check_what = check_x[:CHECK_COUNT], f"{CHECK_COUNT} images of {check_what}"
    res = export_mcu(graph, path, size, mean, std, pixels_of(calib_x, mean, std), pixels_of(check_x, mean, std))
    a, n_ops = res.arena, sum(res.ops.values())
    ok_float = not res.float_tensors
    ok_step = res.step_agreement is not None and res.step_agreement >= MIN_STEP_AGREEMENT
    checks = [
        f"  {res.flash_bytes} bytes of flash, {n_ops} ops, {res.tensors} tensors; calibrated on {what}"
        + (f"; {res.trained_ranges} activation ranges from quantization-aware training" if res.trained_ranges else ""),
        "  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(res.ops.items(), key=lambda kv: -kv[1])),
        f"  input: int8 NHWC (1, {size}, {size}, {chans}) = camera pixel - 128 (scale 1); output: int8 logits "
        f"(scale {res.output_quant[0]:.6g}, zero point {res.output_quant[1]})",
        f"float tensors: {len(res.float_tensors)} "
        + ("OK" if ok_float else "FAIL: " + ", ".join(res.float_tensors[:8])),
        f"TFLM vs LiteRT (int8 outputs, {res.n_checked} images): {(res.step_agreement or 0) * 100:.2f} % within one "
        f"step, max {res.max_step_diff} steps (limit {MIN_STEP_AGREEMENT * 100:.0f} %) {'OK' if ok_step else 'FAIL'}",
        f"top-1 agreement int8 (TFLM) vs fp32 PyTorch on {check_what}: {(res.top1_agreement or 0) * 100:.2f} %",
        f"TFLM arena: {a.get('total', 0)} bytes on this 64-bit host ({a.get('head', 0)} activations + "
        f"{a.get('tail', 0)} fixed); the C++ pair asks for {arena_size(a.get('total', 0))}",
    ]
    names = json.loads(meta.get("class_names", "[]")) or [f"class_{i}" for i in range(res.num_classes)]
    header, source = write_cpp(
        res.path, res.ops, a, res.input_quant, res.output_quant, (size, size, chans), [str(n) for n in names]
    )
    checks.append(f"C++ for TFLM: {header.name} and {source.name} (docs/mcu.md)")
    meta.update(
        input_layout="NHWC int8 = camera pixel (0..255, RGB) - 128; normalization inside the model",
        quantization="int8 ai-edge-quantizer static, per-channel weights, int8 input and output",
        input_quant=json.dumps(list(res.input_quant)),
        output_quant=json.dumps(list(res.output_quant)),
        arena_bytes=json.dumps(a),
    )
    write_json_beside(res.path, meta)
    failures = ([] if ok_float else ["float tensors left"]) + ([] if ok_step else ["TFLM differs from LiteRT"])
    return ExportResult(
        res.path,
        "tflm",
        exporter="ai-edge-quantizer static int8",
        agreement=res.top1_agreement,
        n_checked=res.n_checked,
        notes=res.notes,
        failures=failures,
        checks=checks,
    )


def load_runner(path: str | os.PathLike, threads: int = 1) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``tflm`` target's loader: normalized NCHW images back to camera pixels (the mean / std the sidecar
    records), fed as ``pixel - 128`` through LiteRT's reference kernels (TFLM's arithmetic, in this process), image
    by image; the int8 logits dequantized to float."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # optional heavy dependency

    with captured():
        ref = OpResolverType.BUILTIN_REF
        interp = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=ref)
        interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    out_scale, out_zero = out["quantization"]
    mean, std = pixel_stats(read_json_beside(path), int(inp["shape"][-1]))  # NHWC: the channels last

    def run(x: torch.Tensor) -> np.ndarray:
        q = quantize_pixels(pixels_of(x, mean, std))
        outs = []
        for img in q:
            interp.set_tensor(inp["index"], img[None])
            interp.invoke()
            outs.append(interp.get_tensor(out["index"]).astype(np.float32))
        return (np.concatenate(outs) - out_zero) * out_scale

    return run
