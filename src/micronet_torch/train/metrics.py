"""Accuracy and loss, summed over processes: the training meter and the evaluation loop ``micronet eval`` reuses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import DataConfig, normalize


class Meter:
    """Summed loss and correct counts; reduced over processes by ``reduce``."""

    def __init__(self, device: torch.device) -> None:
        self.t = torch.zeros(4, dtype=torch.float64, device=device)  # loss*n, top1, top5, n

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        self.t += torch.stack(
            [
                loss.detach().double() * n,
                hit[:, 0].sum().double(),
                hit.any(1).sum().double(),
                torch.tensor(float(n), dtype=torch.float64, device=target.device),
            ]
        )

    def reduce(self, distributed: bool) -> dict[str, float]:
        t = self.t.clone()
        if distributed:
            dist.all_reduce(t)
        loss, c1, c5, n = t.tolist()
        n = max(n, 1.0)
        return dict(loss=loss / n, top1=100.0 * c1 / n, top5=100.0 * c5 / n, n=int(t[3].item()))

    def state(self) -> list[float]:
        return self.t.tolist()

    def load(self, values: list[float]) -> None:
        self.t = torch.tensor(values, dtype=torch.float64, device=self.t.device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    dcfg: DataConfig,
    device: torch.device,
    channels_last: bool = False,
    distributed: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Top-1, top-5, cross-entropy and count of ``model`` over ``loader`` (summed over processes), in
    float32 so that ``micronet eval`` of a saved checkpoint gives the very same numbers."""
    was_training = model.training
    model.eval()
    meter = Meter(device)
    for x, y in loader:
        x = normalize(x.to(device, non_blocking=True), dcfg, channels_last)
        y = y.to(device, non_blocking=True)
        logits = model(x).float()
        meter.add(F.cross_entropy(logits, y), logits, y)
        if progress:
            progress(len(y))
    model.train(was_training)
    return meter.reduce(distributed)
