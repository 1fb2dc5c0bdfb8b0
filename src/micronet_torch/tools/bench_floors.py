"""Floors for ``micronet bench --runtimes --floors``: what MicroNet would cost in a runtime if its Dynamic Shift-Max
were cheaper, measured on the very graph the runtime runs.

``+relu`` replaces every Dynamic Shift-Max of the deploy graph by ReLU (the convolutions, pooling and head
unchanged, the way bench-train's ReLU floor does for training): no activation can cost less, so no Dynamic
Shift-Max implementation, standard operators or custom kernel, can take MicroNet below it. ``+noshift`` keeps
the hyper-function and the max over the K fusions but drops the shifted term (J = 1): it does a strict subset
of the operator's work with the same standard operators, so it bounds what any rewrite of the shift can gain.
"""

from __future__ import annotations

import copy

from torch import nn

from ..deploy.modules import FusedShiftMax
from ..deploy.portable import PortableShiftMax, TwinConvShiftMax
from .bench_standins import NoShiftMax, deploy_relu

FLOORS = ("relu", "noshift")
__all__ = ["FLOORS", "NoShiftMax", "floor_graph"]


def floor_graph(graph: nn.Module, kind: str) -> nn.Module:
    """A copy of a deploy graph with every Dynamic Shift-Max replaced as ``kind`` ("relu" or "noshift") says."""
    if kind not in FLOORS:
        raise ValueError(f"unknown floor {kind!r}; choose one of {FLOORS}")
    out = copy.deepcopy(graph).eval()
    make = deploy_relu if kind == "relu" else NoShiftMax
    replaced = _replace(out, make)
    if not replaced:
        raise ValueError("no Dynamic Shift-Max in this graph: floors are for MicroNet deploy graphs")
    return out


def _replace(module: nn.Module, make) -> int:
    count = 0
    for name, child in module.named_children():
        if isinstance(child, TwinConvShiftMax):  # the twin conv is the shift: the floor keeps only the conv
            setattr(module, name, nn.Sequential(child.conv, make(child.shift_max)))
            count += 1
        elif isinstance(child, (PortableShiftMax, FusedShiftMax)):
            setattr(module, name, make(child))
            count += 1
        else:
            count += _replace(child, make)
    return count
