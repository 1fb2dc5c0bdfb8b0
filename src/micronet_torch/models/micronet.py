"""The MicroNet network: one class, driven by a row table, with timm's model surface."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..ops import set_shift_max_impl
from .blocks import MicroBlock, Stem, SwishLinear, Variant
from .specs import MicroNetSpec, scale_width


class MicroNet(nn.Module):
    """MicroNet: stem -> Micro-Blocks (one per table row) -> pooled head of two Linear-BN-h-swish units.

    ``features`` holds the stem and the blocks (``features.0`` the stem, ``features.i`` row i-1), the
    head is ``avgpool`` (ReLU6, global pool, h-swish) then ``classifier`` (SwishLinear, Dropout,
    SwishLinear), exactly as in the published code so that its checkpoints load by name.
    ``width`` scales every block's width (for ablations at matched MAdds); ``variant`` (or its fields
    as keywords) swaps operators for their ablation baselines; ``dsm`` picks how every Dynamic Shift-Max runs
    (``auto``: the fused kernels where they run, ``eager``, ``fused``, ``compile``), not part of the weights.
    """

    def __init__(
        self,
        spec: MicroNetSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float | None = None,
        width: float = 1.0,
        variant: Variant | None = None,
        dsm: str = "auto",
        **variant_kwargs: str,
    ) -> None:
        super().__init__()
        if variant is None:
            variant = Variant(**variant_kwargs)
        elif variant_kwargs:
            raise TypeError(f"pass either variant= or its fields, not both: {sorted(variant_kwargs)}")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"need num_classes >= 0 and in_chans >= 1; got {num_classes}, {in_chans}")
        spec = scale_width(spec, width)
        self.spec, self.variant, self.width = spec, variant, width
        self.num_classes, self.in_chans = num_classes, in_chans
        self.drop_rate = spec.dropout if drop_rate is None else drop_rate

        stem = Stem(in_chans, spec.stem_groups)
        layers: list[nn.Module] = [stem]
        channels, reduction = stem.out_channels, 2
        self.feature_info = [dict(num_chs=channels, reduction=reduction, module="features.0")]
        for row in spec.blocks:
            for repeat in range(row.n):
                block_row = row if repeat == 0 else replace(row, s=1)
                layers.append(MicroBlock(channels, block_row, spec.init_a, spec.init_b, variant))
                channels = row.c
                reduction *= block_row.s
                info = dict(num_chs=channels, reduction=reduction, module=f"features.{len(layers) - 1}")
                if self.feature_info[-1]["reduction"] == reduction:
                    self.feature_info[-1] = info  # keep the last block of each resolution
                else:
                    self.feature_info.append(info)
        self.features = nn.Sequential(*layers)
        self.num_features = channels
        self.head_hidden_size = spec.head_channels
        self.avgpool = nn.Sequential(nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Hardswish())
        self.classifier = nn.Sequential(
            SwishLinear(channels, spec.head_channels),
            nn.Dropout(self.drop_rate),
            self._make_classifier(num_classes),
        )
        self.init_weights()
        set_shift_max_impl(self, dsm)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return SwishLinear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The published initialisation: conv N(0, sqrt(2 / (kh kw C_out))), BN (1, 0), Linear N(0, 0.01)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.normal_(0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.fill_(1)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.01)
                m.bias.zero_()

    # ---- timm model surface -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.classifier[2]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last head unit for ``num_classes`` classes (0 removes it: the model returns pre-logits).

        The new unit is in the model's mode (an eval-mode model's head must not be training BatchNorm1d, which
        fails on one image) and on its device and dtype.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"MicroNet pools by average only; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        head = self._make_classifier(num_classes)
        ref = self.classifier[0].linear[0].weight  # the new head takes the model's mode, device and dtype
        self.classifier[2] = head.to(device=ref.device, dtype=ref.dtype).train(self.training)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^features\.0", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("gradient checkpointing is not supported by MicroNet (it is tiny)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.avgpool(x).flatten(1)
        x = self.classifier[1](self.classifier[0](x))
        return x if pre_logits else self.classifier[2](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
