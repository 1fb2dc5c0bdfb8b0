"""The row tables of MicroNet-M0..M3 (ICCV configs) and the preprint's family, as frozen data.

Each block is one row ``s, n, c, k, e1, e2, g1, g2, c3, g3, g4, y1, y2, y3, r`` (SPEC section 3);
one network class builds every model from these tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class BlockSpec:
    """One row of a MicroNet table.

    s: stride; n: repeats; c: output channels; k: depthwise kernel; e1, e2: depthwise channel
    multipliers; g1: groups of the first pointwise (0 marks Micro-Block-A); g2: groups of the
    activation shift; c3: informational; g3: groups of the second pointwise (0 marks the final
    pointwise block); g4: groups of its shuffle/shift; y1..y3: activation kinds (0 ReLU6 or none,
    1 Dynamic Shift-Max K=1, 2 Dynamic Shift-Max K=2); r: the activations' reduction is 8*r.
    """

    s: int
    n: int
    c: int
    k: int
    e1: int
    e2: int
    g1: int
    g2: int
    c3: int
    g3: int
    g4: int
    y1: int
    y2: int
    y3: int
    r: int

    @property
    def kind(self) -> str:
        """'A' (depthwise first), 'BC' (pointwise, depthwise, pointwise) or 'final' (pointwise only)."""
        if self.g1 == 0:
            return "A"
        if self.g3 == 0:
            return "final"
        return "BC"


@dataclass(frozen=True)
class MicroNetSpec:
    """A whole model: stem groups (s1, s2), block rows, head width, dropout and DSM initial offsets."""

    name: str
    stem_groups: tuple[int, int]
    blocks: tuple[BlockSpec, ...]
    head_channels: int
    dropout: float
    init_a: tuple[float, float]
    init_b: tuple[float, float]
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def stem_channels(self) -> int:
        return self.stem_groups[0] * self.stem_groups[1]


def _rows(*rows: list[int]) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(*row) for row in rows)


MICRONET_M0 = MicroNetSpec(
    name="micronet_m0",
    stem_groups=(2, 2),
    blocks=_rows(
        [2, 1, 8, 3, 2, 2, 0, 4, 8, 2, 2, 2, 0, 1, 1],
        [2, 1, 12, 3, 2, 2, 0, 8, 12, 4, 4, 2, 2, 1, 1],
        [2, 1, 16, 5, 2, 2, 0, 12, 16, 4, 4, 2, 2, 1, 1],
        [1, 1, 32, 5, 1, 4, 4, 4, 32, 4, 4, 2, 2, 1, 1],
        [2, 1, 64, 5, 1, 4, 8, 8, 64, 8, 8, 2, 2, 1, 1],
        [1, 1, 96, 3, 1, 4, 8, 8, 96, 8, 8, 2, 2, 1, 2],
        [1, 1, 384, 3, 1, 4, 12, 12, 0, 0, 0, 2, 2, 1, 2],
    ),
    head_channels=640,
    dropout=0.05,
    init_a=(1.0, 1.0),
    init_b=(0.0, 0.0),
    description="MicroNet-M0 (ICCV 2021): 4 M MAdds, 46.6 % ImageNet top-1",
)

MICRONET_M1 = MicroNetSpec(
    name="micronet_m1",
    stem_groups=(3, 2),
    blocks=_rows(
        [2, 1, 8, 3, 2, 2, 0, 6, 8, 2, 2, 2, 0, 1, 1],
        [2, 1, 16, 3, 2, 2, 0, 8, 16, 4, 4, 2, 2, 1, 1],
        [2, 1, 16, 5, 2, 2, 0, 16, 16, 4, 4, 2, 2, 1, 1],
        [1, 1, 32, 5, 1, 6, 4, 4, 32, 4, 4, 2, 2, 1, 1],
        [2, 1, 64, 5, 1, 6, 8, 8, 64, 8, 8, 2, 2, 1, 1],
        [1, 1, 96, 3, 1, 6, 8, 8, 96, 8, 8, 2, 2, 1, 2],
        [1, 1, 576, 3, 1, 6, 12, 12, 0, 0, 0, 2, 2, 1, 2],
    ),
    head_channels=960,
    dropout=0.05,
    init_a=(1.0, 1.0),
    init_b=(0.0, 0.0),
    description="MicroNet-M1 (ICCV 2021): 6 M MAdds, 51.4 % ImageNet top-1",
)

MICRONET_M2 = MicroNetSpec(
    name="micronet_m2",
    stem_groups=(4, 2),
    blocks=_rows(
        [2, 1, 12, 3, 2, 2, 0, 8, 12, 4, 4, 2, 0, 1, 1],
        [2, 1, 16, 3, 2, 2, 0, 12, 16, 4, 4, 2, 2, 1, 1],
        [1, 1, 24, 3, 2, 2, 0, 16, 24, 4, 4, 2, 2, 1, 1],
        [2, 1, 32, 5, 1, 6, 6, 6, 32, 4, 4, 2, 2, 1, 1],
        [1, 1, 32, 5, 1, 6, 8, 8, 32, 4, 4, 2, 2, 1, 2],
        [1, 1, 64, 5, 1, 6, 8, 8, 64, 8, 8, 2, 2, 1, 2],
        [2, 1, 96, 5, 1, 6, 8, 8, 96, 8, 8, 2, 2, 1, 2],
        [1, 1, 128, 3, 1, 6, 12, 12, 128, 8, 8, 2, 2, 1, 2],
        [1, 1, 768, 3, 1, 6, 16, 16, 0, 0, 0, 2, 2, 1, 2],
    ),
    head_channels=1024,
    dropout=0.1,
    init_a=(1.0, 1.0),
    init_b=(0.0, 0.0),
    description="MicroNet-M2 (ICCV 2021): 12 M MAdds, 59.4 % ImageNet top-1",
)

MICRONET_M3 = MicroNetSpec(
    name="micronet_m3",
    stem_groups=(4, 3),
    blocks=_rows(
        [2, 1, 16, 3, 2, 2, 0, 12, 16, 4, 4, 0, 2, 0, 1],
        [2, 1, 24, 3, 2, 2, 0, 16, 24, 4, 4, 0, 2, 0, 1],
        [1, 1, 24, 3, 2, 2, 0, 24, 24, 4, 4, 0, 2, 0, 1],
        [2, 1, 32, 5, 1, 6, 6, 6, 32, 4, 4, 0, 2, 0, 1],
        [1, 1, 32, 5, 1, 6, 8, 8, 32, 4, 4, 0, 2, 0, 2],
        [1, 1, 64, 5, 1, 6, 8, 8, 48, 8, 8, 0, 2, 0, 2],
        [1, 1, 80, 5, 1, 6, 8, 8, 80, 8, 8, 0, 2, 0, 2],
        [1, 1, 80, 5, 1, 6, 10, 10, 80, 8, 8, 0, 2, 0, 2],
        [2, 1, 120, 5, 1, 6, 10, 10, 120, 10, 10, 0, 2, 0, 2],
        [1, 1, 120, 5, 1, 6, 12, 12, 120, 10, 10, 0, 2, 0, 2],
        [1, 1, 144, 3, 1, 6, 12, 12, 144, 12, 12, 0, 2, 0, 2],
        [1, 1, 864, 3, 1, 6, 12, 12, 0, 0, 0, 0, 2, 0, 2],
    ),
    head_channels=1024,
    dropout=0.1,
    init_a=(1.0, 0.5),
    init_b=(0.0, 0.5),
    description="MicroNet-M3 (ICCV 2021): 21 M MAdds, 62.5 % ImageNet top-1",
)

# The preprint's 44M model (arXiv 2011.12289 v1, Table 1), reconstructed in the row format: no
# published code or weights exist for it. y = (0, 2, 0) as in M3; r = 1 for four rows, then 2.
_V1_M3_ROWS = [
    [2, 1, 32, 3, 2, 2, 0, 16, 32, 4, 4],
    [2, 1, 48, 3, 2, 3, 0, 24, 48, 6, 6],
    [1, 1, 48, 3, 1, 4, 8, 8, 48, 6, 6],
    [1, 1, 48, 3, 1, 4, 8, 8, 48, 6, 6],
    [2, 1, 64, 5, 1, 4, 8, 8, 64, 8, 8],
    [1, 1, 64, 5, 1, 4, 8, 8, 64, 8, 8],
    [1, 1, 96, 5, 1, 4, 8, 8, 96, 8, 8],
    [1, 1, 96, 5, 1, 4, 12, 12, 96, 8, 8],
    [1, 1, 144, 5, 1, 4, 12, 12, 144, 12, 12],
    [1, 1, 144, 5, 1, 4, 12, 12, 144, 12, 12],
    [2, 1, 192, 5, 1, 4, 12, 12, 192, 12, 12],
    [1, 1, 192, 5, 1, 4, 16, 16, 192, 12, 12],
    [1, 1, 192, 5, 1, 4, 16, 16, 192, 12, 12],
    [1, 1, 256, 3, 1, 4, 16, 16, 256, 16, 16],
    [1, 1, 1024, 3, 1, 4, 16, 16, 0, 0, 0],
]
MICRONET_V1_M3 = MicroNetSpec(
    name="micronet_v1_m3",
    stem_groups=(4, 4),
    blocks=_rows(*[[*row, 0, 2, 0, 1 if i < 4 else 2] for i, row in enumerate(_V1_M3_ROWS)]),
    head_channels=1024,
    dropout=0.1,
    init_a=(1.0, 0.5),
    init_b=(0.0, 0.5),
    description=(
        "preprint MicroNet-M3 (44M budget, arXiv 2011.12289 v1): reconstructed from the preprint's "
        "Table 1; no published code or weights (40.2 M MAdds by the paper's counting rule)"
    ),
)

MODEL_SPECS: dict[str, MicroNetSpec] = {
    spec.name: spec for spec in (MICRONET_M0, MICRONET_M1, MICRONET_M2, MICRONET_M3, MICRONET_V1_M3)
}

# The preprint's names for the published models (SPEC section 7): name -> (model built, explanation).
PREPRINT_ALIASES: dict[str, tuple[str, str]] = {
    "micronet_v1_m0": ("micronet_m1", "preprint MicroNet-M0 (6M budget) is the published MicroNet-M1"),
    "micronet_v1_m1": (
        "micronet_m2",
        "preprint MicroNet-M1 (12M budget, 61.1 % top-1 in the preprint) is the published MicroNet-M2",
    ),
    "micronet_v1_m2": ("micronet_m3", "preprint MicroNet-M2 (21M budget) is the published MicroNet-M3"),
}

# Where each model's ImageNet weights are published: PaddleClas's conversion of the paper's (the paper's own
# download links are dead). ``pretrained_cfg`` names them; ``checkpoints.pretrained`` downloads and checks them.
PADDLECLAS_URLS: dict[str, str] = {
    name: f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_{name[-2:].upper()}_pretrained.pdparams"
    for name in ("micronet_m0", "micronet_m1", "micronet_m2", "micronet_m3")
}


def _divisor_for(row: BlockSpec, next_row: BlockSpec | None) -> int:
    """The multiple a row's output width must be: its own groups and shuffles, and the next row's."""
    d = 1
    if row.kind != "final":
        d = math.lcm(row.g3, row.g4, 2)
    if next_row is not None:
        need = math.lcm(next_row.g2, 4 if next_row.kind == "BC" else 2, next_row.g1 or 1)
        d = math.lcm(d, need // math.gcd(need, next_row.e1 * next_row.e2), next_row.g1 or 1)
    return d


def scale_width(spec: MicroNetSpec, width: float) -> MicroNetSpec:
    """``spec`` with every block's width times ``width``, rounded so every group and shuffle still divides.

    Used for the ablations at matched MAdds (for instance plain 1x1 convolutions, made narrower);
    ``width=1`` returns the spec unchanged. The final pointwise block's width follows its input.
    """
    if width == 1:
        return spec
    if width <= 0:
        raise ValueError(f"width must be positive; got {width}")
    rows = list(spec.blocks)
    scaled: list[BlockSpec] = []
    inp = spec.stem_channels
    for i, row in enumerate(rows):
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if row.kind == "final":
            c = inp * row.e1 * row.e2
        else:
            d = _divisor_for(row, nxt)
            c = max(d, round(row.c * width / d) * d)
        scaled.append(replace(row, c=c, c3=c if row.c3 else 0))
        inp = c
    return replace(spec, name=f"{spec.name}_w{width:g}", blocks=tuple(scaled))
