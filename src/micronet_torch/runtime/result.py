"""What an export produced and how it was checked (shared by every export target)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ExportError(ValueError):
    """Export options that cannot work together, an output that cannot be written, or a runtime that is missing;
    the message says what to do."""


class ConversionError(RuntimeError):
    """Every converter a target tried refused the model: the message gives each one's reason."""


@dataclass
class ExportResult:
    """What an export produced and how it was checked."""

    path: Path
    format: str
    exporter: str = ""
    nodes: int | None = None  # ONNX nodes in the written file
    nodes_before_slim: int | None = None
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    agreement: float | None = None  # int8 top-1 agreement with fp32 PyTorch
    n_checked: int = 0
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # what makes the export unusable although it wrote a file
    checks: list[str] = field(default_factory=list)  # report lines of a converter that checks its own file (int8)


def per_image(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any], np.ndarray]:
    """A batch-1 program run over a batch image by image (the file is what a user gets: fixed shape); a
    torch tensor in, a numpy array out."""
    return lambda x: np.concatenate([run(x[i : i + 1].numpy()) for i in range(len(x))])
