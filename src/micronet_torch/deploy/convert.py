"""``convert_to_deploy``: an inference-only MicroNet with the same outputs and far fewer, cheaper operators.

``convert_to_deploy(model, backend=NAME)`` looks the backend up in ``backends.BACKENDS`` and runs it: the
model's features lowered to a flat list of simple operations (``lower``: BatchNorm folded), the backend's
passes over that list (``passes``: permutations folded into convolution weights or Dynamic Shift-Max gathers,
factorized pairs merged, ...), and its emitter (``emit``), which builds the modules and folds the head. Every
rewrite is exact up to float rounding; ``docs/deploy.md`` says why, rewrite by rewrite.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import BACKENDS
from .ir import Op
from .modules import DeployMicroNet


def convert_to_deploy(
    model: nn.Module,
    backend: str = "eager",
    dtype: torch.dtype = torch.float32,
    merge_pairs: bool = True,
    fused_ops: bool = False,
    **options: object,
) -> DeployMicroNet:
    """An inference-only copy of an eval-mode MicroNet with the same outputs (``docs/deploy.md``).

    ``backend`` names a row of ``BACKENDS``: graph forms equally exact but fast on different runtimes
    (``eager``: PyTorch; ``onnx``: ONNX Runtime; ``portable`` and ``portable-<runtime>``: the gather-free graph
    OpenVINO, ExecuTorch/XNNPACK, LiteRT and ncnn lower to their fast kernels). ``merge_pairs=False`` keeps the
    factorized k x 1 / 1 x k pairs of ``eager`` and ``onnx`` unmerged. ``fused_ops`` computes every Dynamic
    Shift-Max's fusion and max with one ``micronet.ShiftMax`` operator, which ONNX Runtime runs from the
    library of ``kernels.ort_ops`` (``onnx``; OpenVINO reads it through its extension), or with the portable
    forms one ``micronet::shift_max`` call, ExecuTorch's kernel (``executorch_ops``). ``options`` are the
    portable forms' keywords (``backends.portable_form``: ``scale_into_conv``, ``densify``, ``merge``,
    ``expand``, ``twin_conv``, ``move_perms``, ``block_shuffles``; ``RUNTIME_OPTIONS`` has each runtime's).
    """
    row = BACKENDS.get(backend)
    if row is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of {tuple(BACKENDS)}")
    unknown = [k for k in options if k not in row.keywords]
    if unknown:
        raise TypeError(f"convert_to_deploy(backend={backend!r}) takes no option(s) {unknown}")
    if fused_ops:
        if "fused_ops" not in row.keywords:
            raise ValueError(f"backend {backend!r} has no fused Dynamic Shift-Max operator form")
        options["fused_ops"] = True
    if not merge_pairs and "merge_pairs" in row.keywords:
        options["merge_pairs"] = False
    row = row.with_options(**options)
    if not hasattr(model, "features") or not hasattr(model, "classifier"):
        raise TypeError(f"convert_to_deploy expects a MicroNet; got {type(model).__name__}")
    return row.emitter(model, row.ops(model), dtype)


def deploy_summary(ops: list[Op]) -> dict[str, int]:
    """Counts of each operation kind in a flat list (explicit gathers left, convs, shift-max)."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    return counts
