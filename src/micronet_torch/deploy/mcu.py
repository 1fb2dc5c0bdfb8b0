"""The microcontroller deploy form: the portable graph in the ops an int8 TensorFlow Lite Micro model quantizes.

``convert_to_deploy(model, backend="mcu")`` builds the portable form (``portable``: gather-free, at most 4-D,
BatchNorm and shuffles folded) and rewrites what a fully int8 TFLM graph cannot hold or pays for in SRAM and flash:

* the clamp of an unscaled Dynamic Shift-Max is ``max(hi - relu(hi - z), lo)``: no MINIMUM, which int8
  quantizers leave in float (ai-edge-quantizer's int8 op list has MAXIMUM, RELU, SUB, not MINIMUM). Exact:
  ``hi - relu(hi - z) = min(z, hi)``.
* ``shift="gather"`` (the default) takes each Dynamic Shift-Max's group-circular shift as one channel GATHER of
  the map (TFLM runs it on int8) instead of a twin convolution (a second copy of the weights in flash) or
  channel rolls (two slices and a concatenation per roll, each a full-size tensor in the arena).
  ``shift="twin"`` keeps the portable twin convolutions, ``shift="rolls"`` the rolls.
* a channel shuffle the passes could not fold into weights is one channel gather too (``ChannelGather``),
  not the portable reshape -> transpose -> reshape, which keeps its neighbours in NCHW with transposes around
  them. The TFLM export lowers each gather to one GATHER op (``tflite_gathers``).
* ``coefficients="matmul"`` (the default) writes each Dynamic Shift-Max's two coefficient layers (1 x 1 convs on
  the pooled 1 x 1 map) as a batched matmul and a bias add (``MatMulLinear``): BATCH_MATMUL ops, whose weights the
  TFLM export quantizes per tensor (``fc_per_tensor``) and stores transposed. TFLM's CONV_2D keeps two int32 per
  output channel in its arena whatever the weights' granularity (5,292 channels in M0: 42 KB); a per-tensor
  BATCH_MATMUL keeps none, and TFLM and LiteRT's reference kernel requantize it with the same fixed-point
  arithmetic. ``"linear"`` writes them as ``nn.Linear`` (FULLY_CONNECTED, per tensor: the same arena, but TFLM's
  FULLY_CONNECTED requantizes with two roundings where LiteRT's reference kernel rounds once, and the flipped
  coefficients move the logits several int8 steps away from LiteRT's: docs/mcu.md); ``"conv"`` keeps the 1 x 1
  convs.
* the classifier runs on the pooled (N, C, 1, 1) map, its linears as 1 x 1 convs, flattened after the last
  (``McuMicroNet``): CONV_2D ops, not FULLY_CONNECTED, in the int8 file. TFLM requantizes both with two roundings
  (gemmlowp's rounding doubling high multiply, then a rounding right shift); LiteRT's reference CONV_2D does the
  same, but its reference FULLY_CONNECTED rounds once (``round(acc * scale)`` in double), one step apart from TFLM
  wherever the exact value lies just under a half step, which the second linear carries to several steps on the
  logits. With CONV_2D the export's TFLM-vs-LiteRT check compares the same arithmetic (bit-equal outputs).

Exact up to float rounding like every deploy form.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .emit import PortableEmitter
from .ir import Op, Perm
from .modules import ChannelGather, DeployMicroNet
from .permutations import is_identity
from .portable import PortableMicroNet, PortableShiftMax, TwinConvShiftMax

SHIFTS = ("gather", "twin", "rolls")
COEFFICIENTS = ("conv", "linear", "matmul")
STEMS = ("merged", "separable")
_MISSING = object()


@contextmanager
def tflite_gathers() -> Iterator[None]:
    """Within: litert_torch converts a ``torch.index_select`` on a 4-D map into one TFLite GATHER.

    Two entries of its tables are set for the time of the conversion: the layout pass reads only the gathered
    map's layout (by default the 1-D index too, which keeps the gather and its neighbours in NCHW, with
    transposes around them), so it moves the channel axis last and rewrites the gather's axis; and the lowering
    is litert_torch's own one for ``tfl.gather`` (its experimental TFLite-op backend) instead of a StableHLO
    gather, which the converter turns into TRANSPOSE + GATHER_ND + TRANSPOSE. TFLM runs GATHER on int8. A
    litert_torch without these tables converts as it would anyway (the three ops per gather: larger, still exact).
    """
    try:  # litert_torch's internal tables (optional, heavy); another version converts without them, as before
        from litert_torch._convert.fx_passes.optimize_layout_transposes_pass import layout_check
        from litert_torch.backend.experimental.torch_tfl import _lowerings
        from litert_torch.backend.lowerings import registry

        tables = (layout_check.layout_sensitive_inputs_getters, registry.global_registry.registered_ops)
        gather_lowering = _lowerings._tfl_gather_lowering
    except (ImportError, AttributeError):
        tables = None
    if tables is None:
        yield
        return

    def lower_gather(lctx, x, dim: int, index):
        return gather_lowering(lctx, x, index, dim)

    op = torch.ops.aten.index_select.default
    patches = [(tables[0], lambda node: [node.args[0]]), (tables[1], lower_gather)]
    saved = [(table, table.get(op, _MISSING)) for table, _ in patches]
    for table, entry in patches:
        table[op] = entry
    try:
        yield
    finally:
        for table, entry in saved:
            if entry is _MISSING:
                table.pop(op, None)
            else:
                table[op] = entry


class McuShiftMax(PortableShiftMax):
    """``PortableShiftMax`` whose clamp has no MINIMUM, whose shift may be one channel gather, and whose coefficient
    layers may be ``nn.Linear`` on the pooled vector."""

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The (K * J [* rolls]) x C coefficients, (N, ., 1, 1): h-sigmoid or clamp, plus offset, times mask."""
        pooled = x.mean((2, 3), keepdim=True)  # keep_dims: a plain mean keeps the map in NCHW behind a TRANSPOSE
        if isinstance(self.fc1, nn.Linear):
            z = self.fc2(F.relu(self.fc1(pooled.flatten(1))))[:, :, None, None]
        else:
            z = self.fc2(F.relu(self.fc1(pooled)))
        if self.scaled:
            coef = F.hardsigmoid(z)
        else:  # clamp(z, lo, hi) = max(hi - relu(hi - z), lo): MAXIMUM, SUB and RELU all quantize to int8
            coef = torch.clamp_min(self.hi - F.relu(self.hi - z), self.lo)
        coef = coef + self.offset
        return coef if self.mask is None else coef * self.mask

    def shifted_maps(self, x: torch.Tensor, x_shifted: torch.Tensor | None) -> list[torch.Tensor]:
        shift_index = self._buffers.get("shift_index")  # the gather form's
        if shift_index is not None:
            return [torch.index_select(x, 1, shift_index)]
        return super().shifted_maps(x, x_shifted)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        _weights_as_own_layout(self, ("fc1", "fc2"), state_dict, prefix)  # the other coefficient form's
        super()._load_from_state_dict(state_dict, prefix, *args)


def _weights_as_own_layout(module: nn.Module, names: Iterable[str], state_dict: dict, prefix: str) -> None:
    """The weights of ``module``'s submodules ``names`` in ``state_dict`` reshaped to their own layout where they
    were saved in the other one (a 1 x 1 conv's (O, I, 1, 1) or a linear layer's (O, I): the same weights), so a
    state dict of either form loads into both."""
    for name in names:
        key, mine = f"{prefix}{name}.weight", module.get_submodule(name).weight
        w = state_dict.get(key)
        if w is not None and w.dim() != mine.dim() and w.numel() == mine.numel():
            state_dict[key] = w.reshape(mine.shape)


class MatMulLinear(nn.Linear):
    """A linear layer written as a batched matmul and a bias add: one BATCH_MATMUL (and an ADD) in a TFLite file
    instead of a FULLY_CONNECTED. With per-tensor weights TFLM's BATCH_MATMUL keeps no per-channel multipliers and
    shifts in its arena, and TFLM and LiteRT's reference kernel requantize its output with the same fixed-point
    arithmetic (their FULLY_CONNECTED kernels do not); the export stores the weights transposed with ``adj_y``
    (``runtime/mcu.py``), else TFLM copies them into its arena to transpose them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.bmm(x.unsqueeze(1), w).flatten(1) + self.bias


def _linear(conv: nn.Conv2d, kind: str = "linear") -> nn.Linear:
    """The 1 x 1 conv ``conv`` as the ``nn.Linear`` it is on a 1 x 1 map (same weights); ``kind="matmul"``: as a
    ``MatMulLinear``."""
    out = (MatMulLinear if kind == "matmul" else nn.Linear)(conv.in_channels, conv.out_channels)
    out = out.to(conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(conv.weight.flatten(1))
        out.bias.copy_(conv.bias)
    return out


def _as_mcu(dsm: PortableShiftMax, kind: str = "conv") -> McuShiftMax:
    """The same Dynamic Shift-Max (same buffers and modules; the coefficient convs as linear layers with ``kind``
    ``"linear"`` or ``"matmul"``) with ``McuShiftMax``'s forward."""
    out = McuShiftMax.__new__(McuShiftMax)
    out.__dict__.update(dsm.__dict__)
    out._modules = dict(dsm._modules)
    if kind != "conv":
        out._modules.update(fc1=_linear(dsm.fc1, kind), fc2=_linear(dsm.fc2, kind))
    out._buffers = dict(dsm._buffers)
    return out


def _gather_form(dsm: PortableShiftMax, kind: str) -> McuShiftMax:
    """A rolls-form ``dsm`` rebuilt to read its shift as one gather ``x[:, shift]``.

    The rolls form multiplies roll ``d`` by a 0/1 mask folded into a repeat of the a_k1 coefficient rows (one
    repeat per roll); each channel's mask is 1 for exactly one roll, which gives the shift:
    ``shift[i] = (i + d_i) mod C``. The gather form keeps a_k0, then a_k1 once for each k (the first repeat).
    """
    c, k, n_rolls = dsm.channels, dsm.k, len(dsm.rolls)
    masks = dsm.mask.view(-1)[k * c : k * c + n_rolls * c].view(n_rolls, c)  # kk = 0: one row block per roll
    d = torch.tensor(dsm.rolls)[masks.argmax(0)]
    shift = (torch.arange(c) + d) % c
    rows = torch.cat([torch.arange(k * c), (k * c + torch.arange(k) * n_rolls * c).repeat_interleave(c)])
    rows[k * c :] += torch.arange(c).repeat(k)
    out = _as_mcu(dsm, kind)
    fc2 = nn.Conv2d(dsm.fc2.in_channels, rows.numel(), 1).to(dsm.fc2.weight.dtype)
    with torch.no_grad():
        fc2.weight.copy_(dsm.fc2.weight[rows])
        fc2.bias.copy_(dsm.fc2.bias[rows])
    out._modules["fc2"] = fc2 if kind == "conv" else _linear(fc2, kind)
    out._buffers["offset"] = dsm.offset[:, rows].clone()
    out._buffers["mask"] = None
    out._buffers["shift_index"] = shift.to(torch.int32)
    out.rolls = []
    return out


def _mcu_module(module: nn.Module, shift: str, kind: str) -> nn.Module:
    """The MCU form of one portable module (recursing into containers)."""
    if isinstance(module, TwinConvShiftMax):
        module.shift_max = _as_mcu(module.shift_max, kind)
        return module
    if isinstance(module, PortableShiftMax):
        return _gather_form(module, kind) if shift == "gather" and module.rolls else _as_mcu(module, kind)
    for name, child in module.named_children():
        setattr(module, name, _mcu_module(child, shift, kind))
    return module


def _conv(linear: nn.Linear) -> nn.Conv2d:
    """The linear layer ``linear`` as the 1 x 1 conv it is on a 1 x 1 map (same weights)."""
    out = nn.Conv2d(linear.in_features, linear.out_features, 1).to(linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, :, None, None])
        out.bias.copy_(linear.bias)
    return out


def _conv_linears(module: nn.Module) -> nn.Module:
    """``module`` with each ``nn.Linear`` in it a 1 x 1 conv."""
    for name, child in module.named_children():
        setattr(module, name, _conv(child) if isinstance(child, nn.Linear) else _conv_linears(child))
    return module


class McuMicroNet(PortableMicroNet):
    """``PortableMicroNet`` whose head runs on the pooled (N, C, 1, 1) map, its linears as 1 x 1 convs, the
    logits flattened at the end (see the module docstring)."""

    def __init__(self, features: nn.Sequential, head: nn.Sequential, num_classes: int) -> None:
        super().__init__(features, _conv_linears(head), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.features(x)).mean((2, 3), keepdim=True)
        return torch.flatten(self.head(x), 1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a state dict saved with the head's linear weights (a --qat checkpoint of the earlier form)
        convs = (f"head.{name}" for name, m in self.head.named_modules() if isinstance(m, nn.Conv2d))
        _weights_as_own_layout(self, convs, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)


def fc_per_tensor(graph: nn.Module) -> bool:
    """Whether the TFLM export quantizes ``graph``'s FULLY_CONNECTED and BATCH_MATMUL weights per tensor (and
    ``--qat`` rounds its linear weights so): the ``mcu`` form with ``coefficients="matmul"`` or ``"linear"``, whose
    Dynamic Shift-Maxes' coefficient layers are linear; otherwise every weight is per output channel, as
    ai-edge-quantizer's static recipe has it."""
    return any(isinstance(m, McuShiftMax) and isinstance(m.fc1, nn.Linear) for m in graph.modules())


@dataclass(frozen=True)
class McuEmitter(PortableEmitter):
    """The portable modules, each Dynamic Shift-Max then rewritten into its MCU form (``shift``, ``coefficients``:
    see above), and the head on the pooled map (``McuMicroNet``)."""

    network: ClassVar[type[DeployMicroNet]] = McuMicroNet
    shift: str = "gather"
    coefficients: str = "matmul"

    def module(self, op: Op, dtype: torch.dtype) -> nn.Module:
        if isinstance(op, Perm):
            # not the portable reshape -> transpose -> reshape; the index is left out of the state dict, so a
            # --qat checkpoint saved with that form (no tensor) still loads
            return nn.Identity() if is_identity(op.index) else ChannelGather(op.index, torch.int32, persistent=False)
        return super().module(op, dtype)

    def features(self, ops: list[Op], dtype: torch.dtype = torch.float32) -> nn.Sequential:
        return _mcu_module(super().features(ops, dtype), self.shift, self.coefficients)
