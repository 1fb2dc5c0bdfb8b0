"""The deploy compiler's one pass list: every rewrite of the flat operation list (``ir``), by name.

A backend (``backends``) is a sequence of these passes, each with its arguments, run over the lowered model;
no backend has a rewrite of its own. Every pass maps an op list to an op list and is exact up to float rounding
(``docs/deploy.md`` says why, rewrite by rewrite). ``PASSES`` lists them in the order a backend runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .fusions import expand_multipliers, fold_shift_max_scale, merge_separable, pair_shift_convs, phase_stem
from .ir import Op
from .permutations import densify_shuffles, fold_perms_into_convs, move_perms_past_shift_max, optimize

PASSES: dict[str, Callable[..., list[Op]]] = {
    # where channel permutations go: into conv weights, Dynamic Shift-Max gathers, or densified grouped convs
    "densify_shuffles": densify_shuffles,
    "optimize": optimize,
    "fold_perms_into_convs": fold_perms_into_convs,
    # reshaping convolutions for a runtime's fast kernels
    "expand_multipliers": expand_multipliers,
    "merge_separable": merge_separable,
    "phase_stem": phase_stem,
    # Dynamic Shift-Max: a shuffle moved past it, its scale into the next conv, its shift into a twin conv
    "move_perms_past_shift_max": move_perms_past_shift_max,
    "fold_shift_max_scale": fold_shift_max_scale,
    "pair_shift_convs": pair_shift_convs,
}


@dataclass(frozen=True)
class Pass:
    """One step of a backend: the pass ``PASSES[name]`` with its keyword arguments."""

    name: str
    args: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in PASSES:
            raise ValueError(f"unknown deploy pass {self.name!r}; the passes are {', '.join(PASSES)}")

    def __call__(self, ops: list[Op]) -> list[Op]:
        return PASSES[self.name](ops, **dict(self.args))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def step(name: str, **args: object) -> Pass:
    """The pass ``name`` with keyword arguments ``args``: ``step("merge_separable", stem_only=True)``."""
    return Pass(name, tuple(args.items()))


def run_passes(passes: tuple[Pass, ...], ops: list[Op]) -> list[Op]:
    """``ops`` after each pass in turn."""
    for p in passes:
        ops = p(ops)
    return ops
