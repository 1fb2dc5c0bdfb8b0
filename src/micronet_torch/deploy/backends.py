"""The deploy backends: one row per graph form, each a sequence of passes from the one pass list and an emitter.

Every backend lowers the model the same way (``lower``), runs its ``passes`` (``passes.PASSES``) and hands the
result to its ``emitter`` (``emit``). Forms differ only in which passes run with which arguments and which
modules the operations become, because each runtime has different fast kernels: PyTorch eager and ONNX
Runtime run gathers well, the deployment runtimes (OpenVINO, ExecuTorch/XNNPACK, LiteRT, ncnn) need a graph
without them. A form is a function of keyword options (``eager_form``, ``onnx_form``, ``portable_form``);
the table ``BACKENDS`` names the rows, including each runtime's tuned portable form. A new backend is one row
here (plus its passes in ``passes.PASSES`` and its emitter, if it needs new ones).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from .emit import DeployEmitter, Emitter, PortableEmitter
from .ir import Op
from .lower import lower
from .mcu import COEFFICIENTS, SHIFTS, STEMS, McuEmitter
from .passes import Pass, run_passes, step

Form = Callable[..., tuple[tuple[Pass, ...], Emitter]]
MERGE_CHOICES = ("none", "stem", "plain", "all")


@dataclass(frozen=True)
class Backend:
    """One deploy graph form: ``passes`` run in order over the lowered operations, then ``emitter``.

    ``options`` are the keywords of ``form`` the row was built with; ``with_options`` rebuilds it with more
    (``convert_to_deploy(model, backend=name, **options)``). A row without a form takes no options.
    """

    name: str
    passes: tuple[Pass, ...]
    emitter: Emitter
    options: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    form: Form | None = None

    @property
    def keywords(self) -> tuple[str, ...]:
        """The options ``with_options`` takes."""
        return () if self.form is None else tuple(inspect.signature(self.form).parameters)

    def with_options(self, **options: object) -> Backend:
        """This row with ``options`` on top of its own (unknown ones raise ``TypeError``)."""
        if not options:
            return self
        unknown = [k for k in options if k not in self.keywords]
        if unknown or self.form is None:
            raise TypeError(f"backend {self.name!r} takes no option(s) {unknown}")
        return row(self.name, self.form, **{**self.options, **options})

    def ops(self, model: nn.Module) -> list[Op]:
        """The finished operation list of an eval-mode MicroNet's features."""
        return run_passes(self.passes, lower(model))


def row(name: str, form: Form, **options: object) -> Backend:
    """The backend ``name``: ``form(**options)``'s passes and emitter."""
    passes, emitter = form(**options)
    return Backend(name, passes, emitter, MappingProxyType(dict(options)), form)


def eager_form(merge_pairs: bool = True, fused_ops: bool = False) -> tuple[tuple[Pass, ...], Emitter]:
    """PyTorch eager: every permutation into Dynamic Shift-Max gathers and conv weights, every factorized
    k x 1 / 1 x k pair merged (``merge_pairs``): oneDNN runs one k x k depthwise conv faster than two thin ones.
    Expanding channel multipliers is left out: oneDNN is slower with the repeated channels."""
    if fused_ops:
        raise ValueError("fused_ops=True makes an ONNX Runtime or ExecuTorch graph; use backend='onnx' or 'portable'")
    passes = (
        step("optimize"),
        *((step("merge_separable"),) if merge_pairs else ()),
        step("fold_shift_max_scale"),
    )
    return passes, DeployEmitter()


def onnx_form(merge_pairs: bool = True, fused_ops: bool = False) -> tuple[tuple[Pass, ...], Emitter]:
    """ONNX Runtime: as eager, plus channel multipliers expanded into plain depthwise convs (its blocked layout
    runs those), after which the permutations are placed once more (one that was stuck after M0's stem now
    moves into conv weights); only the stem's factorized pairs are merged (``merge_pairs``) and computed on
    2 x 2 phases, since ORT runs a merged conv with a channel multiplier on its slow per-group path and a
    merged depthwise one costs k * k taps plus a border-map pass. ``fused_ops``: one ``micronet.ShiftMax``
    node per Dynamic Shift-Max."""
    passes = (
        step("optimize"),
        step("expand_multipliers"),
        step("optimize"),
        *((step("merge_separable", plain_only=True, stem_only=True), step("phase_stem")) if merge_pairs else ()),
        step("fold_shift_max_scale"),
    )
    return passes, DeployEmitter(use_matmul=True, full_maps=True, fused_ops=fused_ops)


def portable_form(
    scale_into_conv: bool = True,
    densify: int = 8,
    merge: str = "none",
    expand: int = 0,
    twin_conv: bool = True,
    move_perms: bool = True,
    block_shuffles: bool = True,
    fused_ops: bool = False,
) -> tuple[tuple[Pass, ...], Emitter]:
    """The gather-free form for OpenVINO, ExecuTorch/XNNPACK, LiteRT and ncnn (``portable``).

    ``densify``: shuffles next to grouped convs of at most that many groups are absorbed by making those
    convs dense (0: never); permutations then go into conv weights where exact, never into a Dynamic
    Shift-Max. ``expand``: channel-multiplier depthwise convs whose producer has at most that many outputs
    become plain depthwise ones. ``merge`` merges factorized k x 1 / 1 x k pairs: "none", "stem", "plain"
    or "all". ``move_perms`` moves a shuffle before a Dynamic Shift-Max past it into the next conv where that
    needs no more rolls. ``scale_into_conv`` lets the convolution after each Dynamic Shift-Max carry the
    hyper-function's scale, so the coefficients are one h-sigmoid plus an offset. ``twin_conv`` computes the
    shift of each Dynamic Shift-Max fed by a dense 1 x 1 conv as a twin of that conv instead of channel rolls
    (not with ``fused_ops``). ``block_shuffles`` writes a shuffle of channel blocks (M0-M3's stems) as one 4-D
    transpose, not slices. ``fused_ops`` computes each Dynamic Shift-Max's fusion and max with one
    ``micronet::shift_max`` call (ExecuTorch's kernel).
    """
    if merge not in MERGE_CHOICES:
        raise ValueError(f"merge={merge!r}: choose none, stem, plain or all")
    passes = (
        *((step("densify_shuffles", max_groups=densify),) if densify else ()),
        step("fold_perms_into_convs"),
        *((step("expand_multipliers", max_channels=expand), step("fold_perms_into_convs")) if expand else ()),
        *(
            (step("merge_separable", plain_only=merge in ("stem", "plain"), stem_only=merge == "stem"),)
            if merge != "none"
            else ()
        ),
        *((step("move_perms_past_shift_max"), step("fold_perms_into_convs")) if move_perms else ()),
        *((step("fold_shift_max_scale"),) if scale_into_conv else ()),
        *((step("pair_shift_convs"),) if twin_conv and not fused_ops else ()),
    )
    return passes, PortableEmitter(block_shuffles=block_shuffles, fused_ops=fused_ops)


def mcu_form(
    shift: str = "gather", merge: str = "all", coefficients: str = "matmul", stem: str = "separable"
) -> tuple[tuple[Pass, ...], Emitter]:
    """The microcontroller form (``mcu.py``): the portable passes with every factorized pair merged, its Dynamic
    Shift-Max written in the ops a fully int8 TFLite Micro model quantizes; ``shift`` takes each group-circular
    shift as one channel gather ("gather"), a twin convolution ("twin") or channel rolls ("rolls"),
    ``coefficients`` its two coefficient layers as batched matmuls ("matmul"), 1 x 1 convs ("conv") or linear
    layers ("linear"), and ``stem`` merges the stem's factorized pair with the other pairs ("merged") or keeps it
    as its k x 1 and 1 x k convs ("separable": TFLM's reference kernels cost per output element and filter tap,
    and the pair has fewer of both than the merged k x k conv)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r}: choose one of {SHIFTS}")
    if coefficients not in COEFFICIENTS:
        raise ValueError(f"coefficients={coefficients!r}: choose one of {COEFFICIENTS}")
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r}: choose one of {STEMS}")
    passes, _ = portable_form(merge=merge, twin_conv=shift == "twin")
    if stem == "separable":
        passes = tuple(
            step(p.name, **dict(p.args), skip_stem=True) if p.name == "merge_separable" else p for p in passes
        )
    return passes, McuEmitter(shift=shift, coefficients=coefficients)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        row("eager", eager_form),
        row("onnx", onnx_form),
        row("onnx-fused", onnx_form, fused_ops=True),
        row("portable", portable_form),
        # each runtime's form, measured fastest on it (M0 and M3, one thread, docs/benchmarks.md). Merging the
        # factorized pairs helps every runtime of the portable form (ExecuTorch since the twin convs)
        row("portable-openvino", portable_form, merge="all"),
        row("portable-xnnpack", portable_form, merge="all"),
        row("portable-xnnpack-fused", portable_form, merge="all", fused_ops=True),
        row("portable-litert", portable_form, merge="all"),
        # ncnn runs a block shuffle's reshapes slower than the equivalent channel slices
        row("portable-ncnn", portable_form, merge="all", block_shuffles=False),
        row("mcu", mcu_form),
    )
}

# the backend row each runtime's export uses ("onnx": the portable form's defaults; ONNX files use ``onnx``)
RUNTIME_BACKENDS: dict[str, str] = {
    "onnx": "portable",
    "openvino": "portable-openvino",
    "executorch": "portable-xnnpack",
    "litert": "portable-litert",
    "ncnn": "portable-ncnn",
}
# each runtime's ``convert_to_deploy(backend="portable", **options)`` keywords: its row's options
RUNTIME_OPTIONS: dict[str, dict[str, object]] = {
    rt: dict(BACKENDS[name].options) for rt, name in RUNTIME_BACKENDS.items()
}
# the keywords ``convert_to_deploy(backend="portable", ...)`` takes besides ``fused_ops``
PORTABLE_OPTIONS = tuple(k for k in inspect.signature(portable_form).parameters if k != "fused_ops")


def portable_ops(
    model: nn.Module,
    scale_into_conv: bool = True,
    densify: int = 8,
    merge: str = "none",
    expand: int = 0,
    move_perms: bool = True,
) -> list[Op]:
    """The operation list of the portable form before twin convs are paired (``portable_form``'s options)."""
    options = dict(scale_into_conv=scale_into_conv, densify=densify, merge=merge, expand=expand, twin_conv=False)
    return BACKENDS["portable"].with_options(**options, move_perms=move_perms).ops(model)


def portable_features(model: nn.Module, dtype: torch.dtype = torch.float32, **options: object) -> nn.Sequential:
    """The portable form's feature extractor of an eval-mode MicroNet (``portable_form``'s options)."""
    backend = BACKENDS["portable"].with_options(**options)
    return backend.emitter.features(backend.ops(model), dtype)
