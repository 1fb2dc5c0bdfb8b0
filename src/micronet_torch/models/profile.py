"""MAdds by the paper's rule (SPEC section 5), per model, per part and per layer.

Counted: every convolution (C_in/groups * k_h * k_w * C_out * H_out * W_out) and linear layer
(in * out per sample), plus Dynamic Shift-Max's per-element multiplies (J * K * C * H * W) and a
squeeze-excitation gate's (C * H * W). Not counted: BatchNorm, activations, pooling, additions,
shuffles, as in the paper. Works on any network (MobileNetV3 from timm too) by forward hooks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..ops import DynamicShiftMax, SqueezeExcite

RULE = (
    "MAdds = conv (C_in/groups*kh*kw*C_out*H_out*W_out) + linear (in*out) + Dynamic Shift-Max "
    "per-element multiplies (J*K*C*H*W) + SE gate multiplies (C*H*W); batch 1"
)


@dataclass
class LayerCount:
    name: str
    type: str
    madds: int
    params: int
    output_shape: list[int]


@dataclass
class Profile:
    model: str
    img_size: int
    params: int
    madds: int
    rule: str = RULE
    parts: dict[str, int] = field(default_factory=dict)
    layers: list[LayerCount] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_madds(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return (module.in_channels // module.groups) * kh * kw * output[0].numel()
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    if isinstance(module, DynamicShiftMax):
        return module.j * module.k * output[0].numel()
    if isinstance(module, SqueezeExcite):
        return output[0].numel()
    return 0


def _part_of(name: str) -> str:
    """The part a layer belongs to: ``stem``, ``block<i>`` (table row i), or ``head``."""
    parts = name.split(".")
    if parts[0] == "features" and len(parts) > 1:
        index = int(parts[1])
        return "stem" if index == 0 else f"block{index - 1}"
    return "head"


@torch.no_grad()
def profile_model(model: nn.Module, img_size: int = 224, in_chans: int | None = None) -> Profile:
    """Count parameters and MAdds of ``model`` on one ``img_size`` x ``img_size`` image."""
    if img_size < 1:
        raise ValueError(f"img_size must be a positive number of pixels; got {img_size}")
    in_chans = in_chans or getattr(model, "in_chans", 3)
    counted = (nn.Conv2d, nn.Linear, DynamicShiftMax, SqueezeExcite)
    layers: list[LayerCount] = []
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            own_params = sum(p.numel() for p in module.parameters(recurse=False))
            layers.append(
                LayerCount(
                    name,
                    type(module).__name__,
                    _layer_madds(module, inputs, output),
                    own_params,
                    list(output.shape[1:]),
                )
            )

        return hook

    for name, module in model.named_modules():
        if isinstance(module, counted):
            handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, in_chans, img_size, img_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    parts: dict[str, int] = {}
    for layer in layers:
        part = _part_of(layer.name)
        parts[part] = parts.get(part, 0) + layer.madds
    spec = getattr(model, "spec", None)
    return Profile(
        model=getattr(spec, "name", type(model).__name__),
        img_size=img_size,
        params=sum(p.numel() for p in model.parameters()),
        madds=sum(layer.madds for layer in layers),
        parts=parts,
        layers=layers,
    )


def format_profile(prof: Profile, per_layer: bool = True) -> str:
    """A readable report: totals, MAdds per part (stem, each table row, head) and per layer."""
    lines = [
        f"model: {prof.model}   input: {prof.img_size}x{prof.img_size}",
        f"params: {prof.params:,}   MAdds: {prof.madds:,} ({prof.madds / 1e6:.2f} M)",
        f"counted: {prof.rule}",
        "",
        f"{'part':<10} {'MAdds (M)':>10}",
    ]
    lines += [f"{part:<10} {madds / 1e6:>10.3f}" for part, madds in prof.parts.items()]
    if per_layer:
        lines += ["", f"{'layer':<42} {'type':<16} {'output':<16} {'params':>9} {'MAdds':>11}"]
        for layer in prof.layers:
            shape = "x".join(str(s) for s in layer.output_shape)
            lines.append(f"{layer.name:<42} {layer.type:<16} {shape:<16} {layer.params:>9,} {layer.madds:>11,}")
    return "\n".join(lines)
