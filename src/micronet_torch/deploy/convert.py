"""``convert_to_deploy``: an inference-only MicroNet with the same outputs and far fewer, cheaper operators.

``convert_to_deploy(model)`` turns an eval-mode ``MicroNet`` into a ``DeployMicroNet``: BatchNorm folded
into the convolutions and linears, every channel shuffle composed with its neighbours and folded into
convolution weights or into a Dynamic Shift-Max's single gather, and each Dynamic Shift-Max reduced to
pool -> Linear -> ReLU -> Linear -> clamp -> one gather -> one batched product (-> one max), and each
factorized k x 1 / 1 x k convolution pair merged into one k x k convolution with a border correction. Every
rewrite is exact up to float rounding; ``docs/deploy.md`` says why, rewrite by rewrite.

The conversion goes through a flat list of simple operations (``Conv``, ``Perm``, ``ShiftMax``, ...),
on which two passes move each channel permutation to where it costs nothing, then builds modules.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.blocks import SwishLinear
from .fusions import expand_multipliers, fold_shift_max_scale, merge_separable, phase_stem
from .ir import Conv, Op, Perm, PhaseStem, ShiftMax
from .lower import _fold_bn, lower
from .mcu import MCU_OPTIONS, mcu_features
from .modules import ChannelGather, DeployMicroNet, FusedShiftMax, PhaseStemConv, _conv_module, nest_residuals
from .permutations import optimize
from .portable import PORTABLE_OPTIONS, PortableMicroNet, portable_features


def build_modules(
    ops: list[Op], dtype: torch.dtype, use_matmul: bool, full_maps: bool | None = None, fused_ops: bool = False
) -> nn.Sequential:
    """Modules for ``ops``; ``use_matmul`` and ``full_maps`` (default: ``use_matmul``) pick ONNX Runtime's forms,
    ``fused_ops`` the ``micronet.ShiftMax`` operator for every Dynamic Shift-Max."""
    full_maps = use_matmul if full_maps is None else full_maps

    def make(op: Op) -> nn.Module:
        if isinstance(op, Conv):
            return _conv_module(op, dtype, full_maps, fold_rows=use_matmul)
        if isinstance(op, Perm):
            return ChannelGather(op.index)
        if isinstance(op, ShiftMax):
            return FusedShiftMax(op, dtype, use_matmul, fused_ops)
        if isinstance(op, PhaseStem):
            return PhaseStemConv(op, dtype, full_maps)
        return op.module

    return nest_residuals(ops, make)


def _fold_linear(unit: nn.Module, dtype: torch.dtype) -> nn.Module:
    """SwishLinear (Linear -> BN1d -> h-swish) as Linear -> h-swish with the BN folded in."""
    if not isinstance(unit, SwishLinear):
        return copy.deepcopy(unit)
    linear, bn, act = unit.linear
    w, b = _fold_bn(linear.weight, linear.bias, bn)
    out = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        out.weight.copy_(w.to(dtype))
        out.bias.copy_(b.to(dtype))
    return nn.Sequential(out, copy.deepcopy(act))


BACKENDS = ("eager", "onnx", "portable", "mcu")


def _head(model: nn.Module, dtype: torch.dtype) -> nn.Sequential:
    """The classifier after the pooled features: h-swish, then each linear with its BatchNorm folded in."""
    pool = list(model.avgpool)
    if not (
        len(pool) == 3
        and isinstance(pool[0], nn.ReLU6)
        and isinstance(pool[1], nn.AdaptiveAvgPool2d)
        and isinstance(pool[2], nn.Hardswish)
    ):
        raise NotImplementedError(f"unexpected head pooling {model.avgpool}")
    return nn.Sequential(
        nn.Hardswish(), *(_fold_linear(m, dtype) for m in model.classifier if not isinstance(m, nn.Dropout))
    )


def convert_to_deploy(
    model: nn.Module,
    backend: str = "eager",
    dtype: torch.dtype = torch.float32,
    merge_pairs: bool = True,
    fused_ops: bool = False,
    **options: object,
) -> DeployMicroNet | PortableMicroNet:
    """An inference-only copy of an eval-mode MicroNet with the same outputs (``docs/deploy.md``).

    ``backend`` picks between layouts that are equally exact but fast on different runtimes: ``onnx``
    also turns channel-multiplying depthwise convs into plain ones by repeating channels (ONNX Runtime
    runs those in its blocked layout; PyTorch's oneDNN is slower with the repeated channels).
    ``merge_pairs`` merges factorized k x 1 / 1 x k pairs into one k x k conv with an exact border
    correction (``merge_separable``): every pair for ``eager``; for ``onnx`` only the stem's pair (and, for
    M0's stem on phases, the depthwise pair after it): a merged k x k depthwise conv does k*k instead of
    2k multiply-adds and needs its border map added, which made it slower than the two convs in ORT.
    ``fused_ops`` computes every Dynamic Shift-Max's fusion and max with one ``micronet.ShiftMax`` operator,
    which ONNX Runtime runs from the library in ``fused/build.py`` (``onnx``; OpenVINO reads it through its
    extension), or with ``portable`` one ``micronet::shift_max`` call, ExecuTorch's kernel (``executorch_ops``).

    ``portable`` builds the gather-free graph of at most 4-D tensors that OpenVINO, ExecuTorch/XNNPACK,
    LiteRT and ncnn lower to their fast kernels (``portable.py``); ``options`` are its keywords
    (``scale_into_conv``, ``densify``, ``merge``, ``expand``, ``twin_conv``, ``move_perms``,
    ``block_shuffles``; ``portable.RUNTIME_OPTIONS`` has each runtime's). ``mcu`` is the portable form in the ops
    of a fully int8 TensorFlow Lite Micro graph (``mcu.py``; options ``shift``, ``merge``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if fused_ops and backend in ("eager", "mcu"):
        raise ValueError("fused_ops=True makes an ONNX Runtime or ExecuTorch graph; use backend='onnx' or 'portable'")
    allowed = {"portable": PORTABLE_OPTIONS, "mcu": MCU_OPTIONS}.get(backend, ())
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise TypeError(f"convert_to_deploy(backend={backend!r}) takes no option(s) {unknown}")
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise TypeError(f"convert_to_deploy expects a MicroNet; got {type(model).__name__}")
    if backend == "portable":
        features = portable_features(model, dtype, **options, fused_ops=fused_ops)  # type: ignore[arg-type]
        portable = PortableMicroNet(features, _head(model, dtype), getattr(model, "num_classes", 0))
        return portable.eval().requires_grad_(False)
    if backend == "mcu":
        features = mcu_features(model, dtype, **options)  # type: ignore[arg-type]
        mcu = PortableMicroNet(features, _head(model, dtype), getattr(model, "num_classes", 0))
        return mcu.eval().requires_grad_(False)
    ops = optimize(lower(model))
    if backend == "onnx":
        # repeating channels turns multiplier convs into depthwise ones, through which a permutation that was
        # stuck before (M0: the one after the stem) now moves into conv weights: optimize once more
        ops = optimize(expand_multipliers(ops))
    if merge_pairs:
        # ONNX Runtime: a merged conv with a channel multiplier falls back to its slow per-group path, and a
        # merged depthwise one costs k*k taps plus a border-map pass: only the stem's pairs are merged there
        ops = merge_separable(ops, plain_only=backend == "onnx", stem_only=backend == "onnx")
        if backend == "onnx":
            ops = phase_stem(ops)
    ops = fold_shift_max_scale(ops)
    features = build_modules(ops, dtype, use_matmul=backend == "onnx", fused_ops=fused_ops)
    deployed = DeployMicroNet(features, _head(model, dtype), getattr(model, "num_classes", 0))
    return deployed.eval().requires_grad_(False)


def deploy_summary(ops: list[Op]) -> dict[str, int]:
    """Counts of each operation kind in a flat list (explicit gathers left, convs, shift-max)."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    return counts
