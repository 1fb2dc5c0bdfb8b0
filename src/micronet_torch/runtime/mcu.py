"""A fully int8 LiteRT file for microcontrollers (TensorFlow Lite Micro), checked in TFLM itself.

``export_mcu`` goes: the ``mcu`` deploy graph (``deploy.mcu``: the portable form with a MINIMUM-free clamp and each
shift as one gather; MobileNetV3 baselines as they are) -> ``PixelInput`` (NHWC camera pixels in, normalization
inside the model as a 1 x 1 depthwise conv, so zero padding stays exact at the image borders) -> a float
``.tflite`` (``litert_torch``) -> Google's ai-edge-quantizer (static int8: per-channel int8 weights, int8
activations, int32 biases, int8 input and output) -> the weights moved back inside the flatbuffer (the quantizer
appends the buffers of a model over 256 KiB after it, which TFLM's loader ignores) and the tensor names dropped.

The input's quantization is fixed to scale 1, zero point -128: the board feeds ``pixel - 128`` and does no float
arithmetic. PyTorch's PT2E route through ``litert_torch`` is not used: its int8 file disagreed with the float
model (docs/mcu.md). The checks: no float tensor left, TFLM's output within one int8 step of LiteRT's, top-1
agreement with the float model on held-out images; TFLM's arena use and the flash size are measured.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._fs import atomic_write
from ..deploy import convert_to_deploy
from ..models import MicroNet
from .calibration import calibration_images
from .export import ExportError
from .litert import export_litert
from .mcu_cpp import arena_size, write_cpp
from .native_log import captured
from .targets import TARGETS
from .tflm import DEFAULT_ARENA, TflmRun, run_tflm

EXTRA = "pip install micronet-torch[mcu]"
INPUT_SCALE, INPUT_ZERO_POINT = 1.0, -128  # int8 input = camera pixel - 128
MIN_STEP_AGREEMENT = 0.99  # TFLM vs LiteRT: outputs within one int8 step
FLOAT32, INT8 = 0, 9  # tflite TensorType


class PixelInput(nn.Module):
    """``graph`` taking NHWC camera pixels (0..255) instead of normalized NCHW floats.

    ``(p / 255 - mean) / std`` is a 1 x 1 depthwise conv (weight ``1 / (255 std)``, bias ``-mean / std``): one
    int8 op, before any padding, so the borders see the same zeros as in the float model.
    """

    def __init__(self, graph: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        c = len(mean)
        self.body = graph
        self.norm = nn.Conv2d(c, c, 1, groups=c)
        m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        with torch.no_grad():
            self.norm.weight.copy_((1.0 / (255.0 * s)).view(c, 1, 1, 1))
            self.norm.bias.copy_(-m / s)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(pixels.permute(0, 3, 1, 2)))


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
    notes: list[str] = field(default_factory=list)


def pixels_of(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalized NCHW images back to the NHWC 0..255 pixels they came from (rounded: they were uint8)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    p = ((x * s + m) * 255.0).round().clamp(0, 255)
    return p.permute(0, 2, 3, 1).numpy().astype(np.float32)


def mcu_graph(model: nn.Module, pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...], **options: Any):
    """The float graph the int8 file quantizes: the ``mcu`` deploy form of a MicroNet (other models as they
    are), taking NHWC pixels."""
    graph = convert_to_deploy(model, backend="mcu", **options) if isinstance(model, MicroNet) else model.eval()
    return PixelInput(graph, pixel_mean, pixel_std).eval()


def _float_tflite(graph: nn.Module, path: Path, shape: tuple[int, int, int, int]) -> Path:
    return export_litert(graph, path, shape)


def _read(data: bytes | bytearray):
    from ai_edge_litert.tools import flatbuffer_utils  # optional heavy dependency: only when exporting

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def quantize_int8(float_path: Path, calib_pixels: np.ndarray) -> bytes:
    """ai-edge-quantizer's static int8 recipe on the float file (per-channel weights), calibrated on
    ``calib_pixels`` (N, H, W, C) with the input range pinned to 0..255; returns the file's bytes with every
    buffer inside the flatbuffer and no tensor names."""
    try:
        from ai_edge_litert.tools import flatbuffer_utils
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as err:
        raise ImportError(f"the int8 LiteRT export needs ai-edge-quantizer: {EXTRA}") from err
    with captured():  # its progress report and TensorFlow's start-up lines
        qt = quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        fmodel = flatbuffer_utils.read_model(str(float_path))
        sig = fmodel.signatureDefs[0]
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        in_name = sig.inputs[0].name
        in_name = in_name.decode() if isinstance(in_name, bytes) else in_name
        data = [{in_name: calib_pixels[i : i + 1]} for i in range(len(calib_pixels))]
        qsvs = qt.calibrate({key: data}, num_threads=1)
        sub = fmodel.subgraphs[0]
        tname = sub.tensors[sub.inputs[0]].name
        tname = tname.decode() if isinstance(tname, bytes) else tname
        # scale 1, zero point -128 exactly: the pixel range, whatever the calibration images held
        qsvs[tname] = {"min": np.zeros_like(qsvs[tname]["min"]), "max": np.full_like(qsvs[tname]["max"], 255.0)}
        quantized = qt.quantize(qsvs, enable_progress_report=False).quantized_model
    model = _read(quantized)  # resolves buffers stored after the flatbuffer into the model
    flatbuffer_utils.strip_strings(model)
    return pack_for_tflm(model)


def pack_for_tflm(model: Any) -> bytes:
    """Serialize a tflite ``ModelT`` for TFLM: every buffer inside the flatbuffer at a 16-byte aligned offset (the
    schema's ``force_align: 16``, which the Python object API ignores; a Cortex-M0 faults on unaligned int32 biases)
    and identical per-channel vectors stored once (flatbuffers allows shared vectors): the weights' and biases'
    int64 zero points are all zeros, 8 bytes a channel, a sixth of M0's file when each tensor has its own."""
    import flatbuffers  # comes with ai-edge-litert

    class Builder(flatbuffers.Builder):
        seen: dict[tuple[str, bytes], int]

        def CreateNumpyVector(self, x: np.ndarray) -> int:
            if x.dtype == np.uint8:  # buffer data
                self.Prep(16, x.size)
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.tobytes())
            if key not in self.seen:
                self.seen[key] = super().CreateNumpyVector(x)
            return self.seen[key]

    for buf in model.buffers:
        if buf.data is not None:
            buf.data = np.frombuffer(bytes(buf.data), dtype=np.uint8)
    for sub in model.subgraphs:
        for t in sub.tensors:
            q = t.quantization
            if q is not None and q.scale is not None:
                q.scale = np.asarray(q.scale, dtype=np.float32)
            if q is not None and q.zeroPoint is not None:
                q.zeroPoint = np.asarray(q.zeroPoint, dtype=np.int64)
    builder = Builder(1 << 20)
    builder.seen = {}
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def describe(data: bytes) -> dict[str, Any]:
    """Op counts, tensor count, float tensors and the input / output quantization of a ``.tflite``."""
    from ai_edge_litert import schema_py_generated
    from ai_edge_litert.tools import flatbuffer_utils

    model = _read(data)
    sub = model.subgraphs[0]
    ops: dict[str, int] = {}
    for op in sub.operators:
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        ops[name] = ops.get(name, 0) + 1
    floats = [str(i) for i, t in enumerate(sub.tensors) if t.type == FLOAT32]

    def quant(index: int) -> tuple[float, int]:
        q = sub.tensors[index].quantization
        return float(q.scale[0]), int(q.zeroPoint[0])

    root = schema_py_generated.Model.GetRootAs(bytes(data), 0)
    misaligned = 0
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        if buf.DataLength():
            misaligned += buf._tab.Vector(buf._tab.Offset(4)) % 16 != 0  # the data's offset in the file
    return dict(
        misaligned_buffers=misaligned,
        ops=ops,
        tensors=len(sub.tensors),
        float_tensors=floats,
        input_type=int(sub.tensors[sub.inputs[0]].type),
        output_type=int(sub.tensors[sub.outputs[0]].type),
        input_quant=quant(sub.inputs[0]),
        output_quant=quant(sub.outputs[0]),
        # the raw table: a buffer stored after the flatbuffer (offset > 1) is one TFLM would not see
        buffers_after=any((b.offset or 0) > 1 for b in flatbuffer_utils.convert_bytearray_to_object(data).buffers),
    )


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
    with tempfile.TemporaryDirectory(prefix="micronet-mcu-") as tmp:
        float_path = _float_tflite(graph, Path(tmp) / "float.tflite", (1, img_size, img_size, in_chans))
        data = quantize_int8(float_path, calib_pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))
    info = describe(data)
    res = McuFile(path, len(data), info["ops"], info["tensors"], info["float_tensors"])
    res.input_quant, res.output_quant = info["input_quant"], info["output_quant"]
    if info["misaligned_buffers"]:
        res.notes.append(f"{info['misaligned_buffers']} buffers not 16-byte aligned")
    if info["input_type"] != INT8 or info["output_type"] != INT8:
        res.float_tensors.append("input/output not int8")
    q_check = quantize_pixels(check_pixels)
    lite = run_litert_int8(path, q_check)
    micro: TflmRun = run_tflm([path], [q_check], arena_size)
    tflm_out = micro.outputs[0].reshape(lite.shape)
    diff = np.abs(tflm_out.astype(np.int32) - lite.astype(np.int32))
    res.step_agreement = float((diff <= 1).mean())
    res.max_step_diff = int(diff.max())
    res.arena = micro.arena[0]
    with torch.no_grad():
        ref = graph(torch.from_numpy(check_pixels)).argmax(1).numpy()
    res.top1_agreement = float((tflm_out.reshape(len(ref), -1).argmax(1) == ref).mean())
    res.n_checked = len(ref)
    return res


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return tuple(values) * channels if len(values) == 1 else tuple(values)


def export_mcu_and_check(
    loaded: Any,
    output: str | os.PathLike,
    calib: str,
    calib_count: int = 512,
    check_count: int = 1000,
    skip_bad: bool = False,
    log: Callable[[str], None] = print,
) -> bool:
    """``micronet export --format tflite --int8``: write the int8 ``.tflite`` and its C++ pair, print the checks
    (no float tensor, TFLM within one int8 step of LiteRT on >= 99 % of outputs) and the figures; False when a
    check fails. Calibration images: ``calib`` (a folder, or fashion-mnist: its training split, and its test
    split for the agreement); held out from a folder when it has more than ``calib_count`` images."""

    model, cfg = loaded.model.eval(), loaded.data_config
    in_chans = getattr(model, "in_chans", cfg.in_chans)
    mean, std = _per_channel(cfg.mean, in_chans), _per_channel(cfg.std, in_chans)
    skipped: dict[str, str] = {}
    if calib == "fashion-mnist":
        cal_x, what = calibration_images(calib, cfg, calib_count, "train", skip_bad, skipped)
        chk_x, check_what = calibration_images(calib, cfg, check_count, "val", skip_bad, skipped)
    else:
        all_x, what = calibration_images(calib, cfg, calib_count + check_count, "train", skip_bad, skipped)
        cal_x, chk_x = all_x[:calib_count], all_x[calib_count:]
        check_what = f"{len(chk_x)} held-out images of {calib}"
        if not len(chk_x):
            chk_x, check_what = cal_x, what + " (the calibration images: none held out)"
    for p, err in sorted(skipped.items()):
        log(f"  skipped unreadable calibration image {p}: {err}")
    out = Path(output).with_suffix(".tflite")
    res = export_mcu(model, out, cfg.img_size, mean, std, pixels_of(cal_x, mean, std), pixels_of(chk_x, mean, std))
    n_ops = sum(res.ops.values())
    log(
        f"exported {loaded.name} (mcu deploy form, fully int8) to {res.path} [ai-edge-quantizer static int8, "
        f"per-channel weights, calibrated on {len(cal_x)} images]: {res.flash_bytes} bytes of flash, {n_ops} ops, "
        f"{res.tensors} tensors"
    )
    log("  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(res.ops.items(), key=lambda kv: -kv[1])))
    log(f"  input: int8 NHWC (1, {cfg.img_size}, {cfg.img_size}, {in_chans}) = camera pixel - 128 (scale 1)")
    ok_float = not res.float_tensors
    log(f"float tensors: {len(res.float_tensors)} {'OK' if ok_float else 'FAIL: ' + ', '.join(res.float_tensors[:8])}")
    ok_step = res.step_agreement is not None and res.step_agreement >= MIN_STEP_AGREEMENT
    log(
        f"TFLM vs LiteRT (int8 outputs, {res.n_checked} images): {res.step_agreement * 100:.2f} % within one step, "
        f"max {res.max_step_diff} steps (limit {MIN_STEP_AGREEMENT * 100:.0f} %) {'OK' if ok_step else 'FAIL'}"
    )
    log(f"top-1 agreement int8 (TFLM) vs fp32 PyTorch on {check_what}: {res.top1_agreement * 100:.2f} %")
    a = res.arena
    log(
        f"TFLM arena: {a.get('total', 0)} bytes on this 64-bit host ({a.get('head', 0)} activations + "
        f"{a.get('tail', 0)} fixed); the C++ pair asks for {arena_size(a.get('total', 0))}"
    )
    names = list(loaded.class_names) or [str(i) for i in range(getattr(model, "num_classes", 0))]
    header, source = write_cpp(
        res.path, res.ops, a, res.input_quant, res.output_quant, (cfg.img_size, cfg.img_size, in_chans), names
    )
    log(f"C++ for TFLM: {header} and {source.name} (docs/mcu.md)")
    return ok_float and ok_step


def run_mcu_export(args: Any, load: Callable[[Any], Any]) -> int:
    """``micronet export --format tflite --int8`` from its parsed flags (``load(args)`` gives the model)."""

    missing = TARGETS["tflite"].missing()
    if missing:
        raise ExportError(missing)
    for package, pip in (("ai_edge_quantizer", "ai-edge-quantizer"), ("tflite_micro", "tflite-micro")):
        if importlib.util.find_spec(package) is None:
            raise ExportError(f"--format tflite --int8 needs {pip}: {EXTRA}")
    if not args.calib:
        raise ExportError("--int8 needs --calib DIR (an image folder, or fashion-mnist)")
    clash = [f for f, on in (("--fused-ops", args.fused_ops), ("--no-deploy", args.no_deploy)) if on]
    if clash:
        raise ExportError(f"--format tflite --int8 writes the mcu deploy form; drop {', '.join(clash)}")
    ok = export_mcu_and_check(load(args), args.output, args.calib, args.calib_count, skip_bad=args.skip_bad_images)
    return 0 if ok else 1
