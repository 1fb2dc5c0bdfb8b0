"""Quantization-aware training of the microcontroller graph: int8 fake quantization where the int8 file quantizes.

The int8 ``.tflite`` (``runtime/mcu.py``) quantizes the ``mcu`` deploy graph (``deploy/mcu.py``): symmetric int8
weights per output channel (per tensor for the coefficient layers' batched matmuls or fully connected layers:
``deploy.mcu.fc_per_tensor``), and every op that computes new values (conv, batched matmul, fully connected, add,
sub, mul, mean, maximum, relu, hard-sigmoid, ...) requantizes its output to
per-tensor asymmetric int8; reshapes, slices and gathers keep their input's quantization, and a conv or add
followed by its only consumer, a relu, is one op (the activation fused). ``QatNet`` trains that same graph with
those roundings simulated, so the network learns weights and ranges that survive them:

* every conv / linear weight passes through per-channel (linear weights, with ``fc_per_tensor``: per-tensor)
  symmetric int8 fake quantization (-127..127);
* every requantizing op's output passes through a ``FakeQuant`` whose range is a moving average of the batch
  minimum and maximum (min-max calibration, as ai-edge-quantizer's static recipe does), with 0 inside it.

The graph is the deploy module itself, run under a ``TorchFunctionMode`` that sees each torch call: no tracer is
needed (the deploy graph's slicing reads tensor shapes, which ``torch.fx`` cannot trace) and the state dict keeps
the deploy graph's names. The calls a forward makes are fixed by the graph, so the ``k``-th requantizing call
always uses ``FakeQuant`` ``k``; a first pass at construction creates them and finds the fused activations.

PyTorch's own QAT (``torch.ao.quantization``) is deprecated and needs a traceable graph, and torchao's targets
linear layers of language models; neither places quantization where TFLite's converter does.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..data.config import channel_stats
from ..models import MicroNet
from .convert import convert_to_deploy
from .mcu import fc_per_tensor
from .pixel_input import PixelInput

QMIN, QMAX = -128, 127  # int8 activations (asymmetric, per tensor)
WMAX = 127  # int8 weights (symmetric: -127..127; per output channel, or per tensor)
# torch calls that compute new values: TFLite requantizes their output (names of the torch functions / methods)
REQUANTIZING = frozenset(
    "conv2d linear add __add__ __radd__ __iadd__ sub __sub__ __rsub__ mul __mul__ __rmul__ __imul__ relu relu_ "
    "relu6 hardtanh hardsigmoid hardswish clamp clamp_min clamp_max maximum minimum mean adaptive_avg_pool2d "
    "avg_pool2d cat concat div __truediv__ sigmoid matmul bmm".split()
)
FUSED_ACTIVATIONS = frozenset({"relu", "relu_", "relu6", "hardtanh"})  # folded into the producing op by TFLite
# TFLite's CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, SUB and MUL carry a fused activation
FUSING_PRODUCERS = frozenset(
    "conv2d linear add __add__ __radd__ __iadd__ sub __sub__ __rsub__ mul __mul__ __rmul__ __imul__".split()
)
ADDS = frozenset("add __add__ __radd__ __iadd__".split())
# What the simulation matches in the file, by version (a --qat checkpoint keeps the one it was trained with):
# 1: every requantizing call's output quantized on its own range;
# 2: as the converter writes the file, a hard-sigmoid is relu6(z + 3) (one ADD with RELU6 fused, requantized)
#    times 1 / 6 (a MUL), and a bias add before it is folded into that ADD (not requantized); the inputs of a
#    maximum take the maximum's range (the quantizer gives MAXIMUM's inputs its output's quantization), so an op
#    whose only consumer is a maximum is not requantized on its own.
SIM_VERSION = 2


def fake_quant_weight(w: torch.Tensor, per_tensor: bool = False) -> torch.Tensor:
    """``w`` rounded to per-output-channel symmetric int8 (scale ``max|w_c| / 127``), or with ``per_tensor`` to one
    scale ``max|w| / 127`` (a linear layer: the file's FULLY_CONNECTED weights), with a straight-through gradient:
    what ai-edge-quantizer stores. Idempotent, so the export re-quantizes these values exactly."""
    if per_tensor:
        scale = w.detach().abs().amax().clamp_min(1e-12).float() / WMAX
        zero = torch.zeros((), dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_tensor_affine(w, scale, zero, -WMAX, WMAX)
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-12) / WMAX
    zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -WMAX, WMAX)


class FakeQuant(nn.Module):
    """Per-tensor asymmetric int8 fake quantization with a moving-average min-max range.

    In training the range follows each batch's minimum and maximum (``momentum``); in eval it is fixed. The range
    always holds 0 (TFLite's zero point must be an integer in range). ``lo`` / ``hi`` are buffers: saved and
    restored with the model, and broadcast from rank 0 under DDP.
    """

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 scale and zero point of the current range."""
        lo, hi = self.lo.clamp(max=0.0), self.hi.clamp(min=0.0)
        scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(1e-8)
        zero = (QMIN - torch.round(lo / scale)).clamp(QMIN, QMAX).to(torch.int32)
        return scale.float(), zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.detach().amin().float(), x.detach().amax().float()
                if bool(self.observed):
                    self.lo.lerp_(lo, self.momentum)
                    self.hi.lerp_(hi, self.momentum)
                else:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                    self.observed.fill_(True)
        scale, zero = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, QMIN, QMAX)

    def extra_repr(self) -> str:
        return f"range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


def _name(func: Any) -> str:
    return getattr(func, "__name__", "")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class _QatMode(TorchFunctionMode):
    """Runs ``net.graph`` with the weights and requantized outputs fake-quantized (see the module docstring).

    Activations are told from weights and constants by provenance: the input and whatever a call derives from an
    activation. With ``record`` it creates the ``FakeQuant``s and notes, per requantizing call, which producer it
    consumes, so the net can mark the producers whose sole consumer is a fused activation.
    """

    def __init__(self, net: QatNet, record: bool = False, capture: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.net, self.record, self.capture = net, record, capture
        self.index = 0
        self.activations: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.producer: dict[int, int] = {}  # id of an activation -> index of the requantizing call that made it
        self.consumers: dict[int, list[str]] = {}  # requantizing call -> names of the calls reading its output
        # requantizing call -> the requantizing calls reading its output, through reshapes, slices and gathers
        self.reached: dict[int, list[str]] = {}
        self.reach: dict[int, int] = {}  # id of an activation -> the requantizing call whose values it carries
        self.kept: list[torch.Tensor] = []  # while recording: keep outputs alive so their ids stay unique

    def mark(self, x: torch.Tensor) -> None:
        self.activations[id(x)] = x

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = _name(func)
        inputs = [t for t in _tensors(args) + _tensors(list(kwargs.values())) if self.activations.get(id(t)) is t]
        if not inputs:
            return func(*args, **kwargs)
        if name in ("conv2d", "linear") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            per_tensor = name == "linear" and self.net.fc_per_tensor
            args = (args[0], fake_quant_weight(args[1], per_tensor=per_tensor), *args[2:])
        elif name == "bmm" and len(args) > 1 and self.activations.get(id(args[1])) is not args[1]:
            # a MatMulLinear's weights (deploy.mcu): BATCH_MATMUL's constant operand, per tensor in the file
            args = (args[0], fake_quant_weight(args[1], per_tensor=True), *args[2:])
        if name == "hardsigmoid" and self.net.version >= 2:
            return self._hardsigmoid(args[0], inputs)
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        sources = self._consumed(name, inputs)
        if name in REQUANTIZING:
            out = self._requantize(name, out)
        elif self.record:
            self.kept.append(out)
            if sources:  # a reshape, slice or gather: the same values, the same quantization
                self.reach[id(out)] = sources[0]
        self.mark(out)
        return out

    def _consumed(self, name: str, inputs: list[torch.Tensor]) -> list[int]:
        """While recording: note ``name`` as a consumer of its inputs' producers; the requantizing calls whose
        values the inputs carry."""
        if not self.record:
            return []
        for t in inputs:
            if id(t) in self.producer:
                self.consumers[self.producer[id(t)]].append(name)
        sources = [self.reach[id(t)] for t in inputs if id(t) in self.reach]
        if name in REQUANTIZING:
            for k in sources:
                self.reached[k].append(name)
        return sources

    def _requantize(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """The next quantization point: created (recording), captured (float values) or applied."""
        k = self.index
        self.index += 1
        if self.record:
            self.net.fq.append(FakeQuant(self.net.momentum).to(out.device))
            self.net.ops.append(name)
            self.consumers[k], self.reached[k] = [], []
            self.producer[id(out)] = self.reach[id(out)] = k
            self.kept.append(out)
        elif self.capture is not None:  # float values, as the float file computes them
            self.capture.append(out)
        elif k not in self.net.fused:
            out = self.net.fq[k](out)
        return out

    def _hardsigmoid(self, z: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        """``hardsigmoid(z)`` as the file computes it: ``relu6(z + 3)`` requantized, times 1 / 6 requantized."""
        self._consumed("hardsigmoid", inputs)
        inner = self._requantize("hardsigmoid.relu6", torch.nn.functional.relu6(z + 3.0))
        self._consumed("hardsigmoid", [inner])
        out = self._requantize("hardsigmoid", inner * (1.0 / 6.0))
        self.mark(out)
        return out


class QatNet(nn.Module):
    """A deploy graph trained with int8 fake quantization (see the module docstring).

    ``graph`` takes normalized NCHW images (the ``mcu`` deploy form of a MicroNet, or a baseline as it is), and
    ``input_quant`` stands for the int8 output of the file's first op, the normalization; or ``graph`` is a
    ``PixelInput`` with its stem folded (``qat_net`` with the data's mean and std), the file's own graph: the
    normalized images are turned back into camera pixels, rounded to integers as the board feeds them
    (``input_quant`` fixed to scale 1, zero point -128) and the stem's folded weights are what is rounded.
    ``example`` is one input batch's shape (NCHW) for the first pass.
    """

    def __init__(
        self, graph: nn.Module, example: tuple[int, ...], momentum: float = 0.01, version: int = SIM_VERSION
    ) -> None:
        super().__init__()
        self.graph = graph
        self.momentum = momentum
        self.version = version  # SIM_VERSION's: what the simulation matches in the file
        if version >= 2:  # saved with the weights, so a checkpoint is restored in the version it was trained in
            self.register_buffer("sim_version", torch.tensor(version))
        self.pixels = isinstance(graph, PixelInput) and graph.folded
        self.input_quant = FakeQuant(0.0 if self.pixels else momentum)
        if self.pixels:  # camera pixels: 0..255 in int8 steps of 1, fixed
            self.input_quant.hi.fill_(255.0)
            self.input_quant.observed.fill_(True)
        self.fq = nn.ModuleList()
        self.ops: list[str] = []
        self.fused: set[int] = set()
        self.fc_per_tensor = fc_per_tensor(graph)  # linear weights rounded per tensor, as the file stores them
        p = next(graph.parameters())
        with torch.no_grad():
            mode = _QatMode(self, record=True)
            self._run(torch.zeros(example, dtype=p.dtype, device=p.device), mode, quantize_input=False)
        self.fused = {
            k
            for k, users in mode.consumers.items()
            if self.ops[k] in FUSING_PRODUCERS and len(users) == 1 and users[0] in FUSED_ACTIVATIONS
        }
        if version >= 2:  # folded into the hard-sigmoid's ADD; requantized to the maximum's range
            self.fused |= {
                k
                for k, users in mode.consumers.items()
                if (self.ops[k] in ADDS and mode.reached[k] == ["hardsigmoid"]) or users == ["maximum"]
            }

    def graph_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ``graph`` takes for normalized NCHW images ``x``: ``x``, or for a pixel graph the camera pixels
        (NHWC, 0..255) they were normalized from."""
        if not self.pixels:
            return x
        norm = self.graph.norm  # (p / 255 - mean) / std as a 1 x 1 depthwise conv: inverted
        w, b = norm.weight.detach().view(1, -1, 1, 1), norm.bias.detach().view(1, -1, 1, 1)
        return ((x - b) / w).permute(0, 2, 3, 1)

    def _run(self, x: torch.Tensor, mode: _QatMode, quantize_input: bool = True) -> torch.Tensor:
        """``graph`` on normalized NCHW ``x`` under ``mode`` (``graph_input``), the input rounded as the file's
        input is (``input_quant``) unless ``quantize_input`` is off."""
        x = self.graph_input(x)
        if quantize_input:
            x = self.input_quant(x)
        mode.mark(x)
        with mode:
            return self.graph(x)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.graph, "num_classes", None)

    def train(self, mode: bool = True) -> QatNet:
        """Train mode moves the ranges; the graph itself stays in eval mode (a deploy graph is inference-only:
        no BatchNorm, no dropout), its weights still trainable."""
        self.training = mode
        self.input_quant.train(mode)
        self.fq.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, _QatMode(self))

    def float_values(self, x: torch.Tensor) -> list[tuple[torch.Tensor, FakeQuant]]:
        """The float graph's tensor at each quantization point for normalized input ``x``, with its ``FakeQuant``
        (the input's first; fused producers left out): what the float file computes there, to find its tensors by
        value."""
        values: list[torch.Tensor] = []
        with torch.no_grad():
            self._run(x, _QatMode(self, capture=values), quantize_input=False)
        first = (self.graph_input(x), self.input_quant)
        return [first] + [(v, self.fq[k]) for k, v in enumerate(values) if k not in self.fused]

    def float_graph(self) -> nn.Module:
        """The deploy graph with its weights rounded as the int8 file stores them (a plain float module to export:
        re-quantizing these weights, per channel or per tensor as the file does, gives the same int8 values); a
        pixel graph's trainable stem becomes a fixed one with its folded weights rounded."""
        graph = copy.deepcopy(self.graph).eval()
        keep: set[int] = set()
        if self.pixels:
            features = graph.body.features
            features[0] = features[0].frozen(fake_quant_weight)
            keep = {id(m) for m in (*features[0].modules(), graph.norm)}  # the stem's source weights, the norm
        with torch.no_grad():
            for m in graph.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in keep:
                    per_tensor = self.fc_per_tensor and isinstance(m, nn.Linear)
                    m.weight.copy_(fake_quant_weight(m.weight, per_tensor=per_tensor))
        return graph

    def extra_repr(self) -> str:
        return f"requantizing ops={len(self.fq)}, fused activations={len(self.fused)}"


def qat_net(
    model: nn.Module,
    img_size: int,
    in_chans: int,
    pixel_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    version: int = SIM_VERSION,
    **options: Any,
) -> QatNet:
    """``QatNet`` of a float model: a MicroNet's ``mcu`` deploy form (BatchNorm folded: fine-tune a trained
    network; ``options`` are the form's, e.g. ``coefficients="linear"``), another model (the MobileNetV3 baselines)
    as it is, in eval mode (no dropout, no batch statistics). With ``pixel_norm`` (the data's mean and std) a
    MicroNet's graph takes camera pixels with the normalization folded into its stem, as the int8 file does
    (``deploy.pixel_input``): the folded weights are the ones rounded, and the file has no normalization op.
    ``version``: what the simulation matches in the file (``SIM_VERSION``)."""
    mcu = isinstance(model, MicroNet)
    graph = convert_to_deploy(model, backend="mcu", **options) if mcu else copy.deepcopy(model)
    if mcu and pixel_norm is not None:
        mean, std = (tuple(channel_stats(v, in_chans)) for v in pixel_norm)  # what the training images saw
        graph = PixelInput(graph, mean, std, fold_stem=True, trainable_stem=True)
    graph.eval()
    for p in graph.parameters():
        p.requires_grad_(True)
    if isinstance(graph, PixelInput):
        graph.norm.requires_grad_(False)  # the data's normalization: constants
    return QatNet(graph, (1, in_chans, img_size, img_size), version=version)


def restore_qat(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    img_size: int,
    in_chans: int,
    pixel_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> QatNet:
    """The ``QatNet`` a ``--qat`` run saved (``state``), rebuilt on ``model`` (the float network it started from)
    in the form it was trained in, and in eval mode: a state with a pixel graph's keys on ``pixel_norm`` (one of the
    earlier form, trained on normalized images, without), with 4-D coefficient weights in the 1 x 1 conv
    coefficient form (whose weights are rounded per channel), with the stem merged or separable as its keys say
    (``_stem_form``), in its simulation's version (``SIM_VERSION``; 1 where it saved none); weights that do not fit
    are a ``ValueError``, one line."""
    pixels = any(k.startswith("graph.body.") for k in state)
    convs = any(k.endswith((".fc1.weight", ".fc2.weight")) and v.dim() == 4 for k, v in state.items())
    options: dict[str, str] = {}
    if isinstance(model, MicroNet):
        if convs:
            options["coefficients"] = "conv"
        options["stem"] = _stem_form(state)
    version = int(state["sim_version"]) if "sim_version" in state else 1
    qnet = qat_net(model, img_size, in_chans, pixel_norm if pixels else None, version, **options)
    try:
        qnet.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            "the --qat checkpoint's int8 graph does not fit its model: " + " ".join(str(err).split())[:300]
        ) from err
    return qnet.eval()


def _stem_form(state: dict[str, torch.Tensor]) -> str:
    """The ``mcu`` form's ``stem`` a ``--qat`` state was trained with: "separable" where its first conv is the
    stem's 3 x 1 one (a pixel graph's ``PixelSeparableStem``, or the deploy form's first conv), else "merged"."""
    if "graph.body.features.0.conv1.weight" in state:
        return "separable"
    first = state.get("graph.features.0.weight")
    return "separable" if first is not None and tuple(first.shape[2:]) == (3, 1) else "merged"


def with_qat(loaded: Any, for_export: bool = False) -> Any:
    """``loaded`` (a ``LoadedModel``) with a ``--qat`` run's trained graph in place of the float network: the
    ``QatNet`` (int8 simulated) to evaluate, or with ``for_export`` its float graph with int8-rounded weights
    (``QatNet.float_graph``), which every export target takes as it is. Other checkpoints come back unchanged."""
    state = loaded.info.get("qat_state")
    if state is None:
        return loaded
    cfg = loaded.data_config
    qnet = restore_qat(loaded.model, state, cfg.img_size, cfg.in_chans, (tuple(cfg.mean), tuple(cfg.std)))
    loaded.model = Int8Graph(qnet) if for_export else qnet
    return loaded


class Int8Graph(nn.Module):
    """What a ``--qat`` run exports: its float graph with int8-rounded weights (``QatNet.float_graph``), a plain
    module to every target, taking normalized NCHW images; ``qat_net`` keeps the trained ranges, which the int8
    microcontroller export uses in place of calibrated ones (``runtime/mcu.py``), and ``pixel_graph`` is the graph
    on camera pixels that export quantizes when the run trained one (else None)."""

    def __init__(self, qnet: QatNet) -> None:
        super().__init__()
        self.graph = qnet.float_graph()
        self.__dict__["qat_net"] = qnet  # not a submodule: its weights are not the exported ones

    @property
    def pixel_graph(self) -> PixelInput | None:
        return self.graph if self.qat_net.pixels else None

    @property
    def num_classes(self) -> int | None:
        return getattr(self.graph, "num_classes", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat_net.pixels:  # normalized images back to pixels, through the folded stem
            return self.graph.body(self.qat_net.graph_input(x).permute(0, 3, 1, 2))
        return self.graph(x)
