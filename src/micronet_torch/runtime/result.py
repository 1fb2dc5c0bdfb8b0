"""What an export produced and how it was checked (shared by every export target)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
