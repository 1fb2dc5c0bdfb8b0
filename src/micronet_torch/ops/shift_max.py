"""Dynamic Shift-Max: MicroNet's input-dependent activation, and the variants the paper ablates.

For C channels in G groups, y_i = max_{k<K} sum_{j<J} a^k_{i,j}(x) * x_{shift_j(i)}, where shift_0 is
the identity and shift_1 the group-circular channel shift. The coefficients a come from a small
squeeze-excitation hyper-function of x, so the activation adapts to each input (SPEC section 1).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..kernels.fused import available, fused_shift_max

SHIFT_MODES = ("published", "group")
# How the fusion and max run: "eager" (torch ops), "fused" (one-pass kernels, kernels.fused), "compile"
# (torch.compile of the eager ops), "auto" (fused while training where the kernels run, else eager).
IMPLS = ("auto", "eager", "fused", "compile")
_impl_override: str | None = None  # set by use_shift_max_impl; wins over every module's own impl


def squeeze_channels(channels: int, reduction: int) -> int:
    """Hidden width S of the hyper-function: make_divisible(C // reduction, 4), at least 4."""
    # timm on first use, not at import: importing timm registers the models with timm (``micronet_torch``'s
    # hook), which must not run while ``ops`` itself is still being imported
    from timm.layers import make_divisible

    return max(4, make_divisible(channels // reduction, 4))


def shift_index(channels: int, groups: int, mode: str = "published") -> torch.Tensor:
    """Index vector of the group-circular shift: ``x_shifted = x[:, index]``.

    Channels are viewed as (G, C/G). ``"published"`` (what the released weights need) takes channel
    (g, p) from ((g+1) mod G, (p+1) mod C/G); ``"group"`` (the paper's formula) from ((g+1) mod G, p).
    """
    if mode not in SHIFT_MODES:
        raise ValueError(f"unknown shift mode {mode!r}; choose one of {SHIFT_MODES}")
    if groups <= 0 or channels % groups:
        raise ValueError(f"Dynamic Shift-Max needs groups dividing channels; got {channels} channels, {groups} groups")
    grid = torch.arange(channels).view(groups, channels // groups).roll(-1, dims=0)
    if mode == "published":
        grid = grid.roll(-1, dims=1)
    return grid.reshape(-1)


class DynamicShiftMax(nn.Module):
    """Dynamic Shift-Max over ``channels`` channels in ``groups`` groups.

    Args:
        channels: C, the number of input (and output) channels.
        groups: G, the number of channel groups the circular shift moves between.
        k: K, the number of fusions the max runs over (1 means a plain dynamic fusion, no max).
        j: J, the number of shifted copies fused (2: x and its shift; 1: no shift, DY-ReLU-like).
        reduction: the hyper-function's squeeze ratio (S = make_divisible(C // reduction, 4)).
        init_a: the offsets added to a^1, a^2 (the coefficients of x itself).
        init_b: the offsets added to b^1, b^2 (the coefficients of the shifted x).
        shift: ``"published"`` (group and in-group rotation, needed by the released weights) or
            ``"group"`` (the paper's group-only shift).
        act_max: the hyper-function's output range: coefficients are (h_sigmoid - 0.5) * 2 * act_max.
        impl: how the fusion and max run, one of ``IMPLS``; not part of the state dict (see
            ``set_shift_max_impl`` and ``use_shift_max_impl`` to change it for a whole model).
    """

    def __init__(
        self,
        channels: int,
        groups: int,
        k: int = 2,
        j: int = 2,
        reduction: int = 8,
        init_a: Sequence[float] = (1.0, 0.0),
        init_b: Sequence[float] = (0.0, 0.0),
        shift: str = "published",
        act_max: float = 2.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.impl = _check_impl(impl)
        if k not in (1, 2) or j not in (1, 2):
            raise ValueError(f"Dynamic Shift-Max supports K in (1, 2) and J in (1, 2); got K={k}, J={j}")
        self.channels, self.groups, self.k, self.j = channels, groups, k, j
        self.shift_mode = shift
        self.scale = 2.0 * act_max
        self.init_a = tuple(float(v) for v in init_a)
        self.init_b = tuple(float(v) for v in init_b)
        squeeze = squeeze_channels(channels, reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, channels * j * k),
            nn.Hardsigmoid(),
        )
        # The shift is a fixed function of the shape, not a weight: never saved in checkpoints.
        self.register_buffer("index", shift_index(channels, groups, shift), persistent=False)
        # Offsets in the published order a1, b1, a2, b2 (a1, a2 when J = 1), each C long.
        offsets = []
        for kk in range(k):
            offsets.append(self.init_a[kk])
            if j == 2:
                offsets.append(self.init_b[kk])
        self.register_buffer("offset", torch.tensor(offsets).repeat_interleave(channels), persistent=False)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic coefficients, shaped (N, K, J, C, 1, 1)."""
        n = x.shape[0]
        z = self.fc(x.mean((2, 3)))
        z = (z - 0.5) * self.scale + self.offset
        return z.view(n, self.k, self.j, self.channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coef = self.coefficients(x)
        impl = self.resolved_impl(x)
        if impl == "fused":
            return fused_shift_max(x, coef, self.index, self.k, self.j)
        if impl == "compile":
            return _compiled_fusion()(x, coef, self.index, self.k, self.j)
        return shift_max_fusion(x, coef, self.index, self.k, self.j)

    def resolved_impl(self, x: torch.Tensor) -> str:
        """The implementation this call uses. Exporters and tracers always get "eager" (the training kernels
        have no ONNX form); "auto" means fused while training (grad on) where the fused kernels run on x's
        device, eager otherwise; an explicit "fused" that cannot run there falls back to eager with one
        warning."""
        impl = _impl_override or getattr(self, "impl", "auto")  # modules pickled before impl existed: auto
        if impl == "eager" or _exporting():
            return "eager"
        if impl == "compile":
            return impl
        if impl == "auto" and not (self.training and torch.is_grad_enabled()):
            return "eager"
        if available(x.device):
            return "fused"
        if impl == "fused":
            _warn_once(f"fused Dynamic Shift-Max does not run on {x.device.type}; using the eager path")
        return "eager"

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, groups={self.groups}, K={self.k}, J={self.j}, "
            f"init_a={self.init_a}, init_b={self.init_b}, shift={self.shift_mode!r}, impl={self.impl!r}"
        )


def shift_max_fusion(x: torch.Tensor, coef: torch.Tensor, index: torch.Tensor, k: int, j: int) -> torch.Tensor:
    """The eager fusion and max: max_k sum_j coef[:, k, j] * x[:, shift_j], coef shaped (N, K, J, C, 1, 1)."""
    if j == 2:
        shifted = torch.index_select(x, 1, index)
        out = x * coef[:, 0, 0] + shifted * coef[:, 0, 1]
        if k == 2:
            out = torch.maximum(out, x * coef[:, 1, 0] + shifted * coef[:, 1, 1])
    else:
        out = x * coef[:, 0, 0]
        if k == 2:
            out = torch.maximum(out, x * coef[:, 1, 0])
    return out


_compiled = None


def _compiled_fusion():
    """``torch.compile`` of ``shift_max_fusion``, made on first use (one graph per (K, J) and shape)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(shift_max_fusion, fullgraph=True)
    return _compiled


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown Dynamic Shift-Max impl {impl!r}; choose one of {IMPLS}")
    return impl


def _exporting() -> bool:
    """Whether an exporter or tracer is running: they must see the eager ops, not the training kernel."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def set_shift_max_impl(model: nn.Module, impl: str) -> int:
    """Set ``impl`` on every DynamicShiftMax in ``model``; returns how many there are."""
    _check_impl(impl)
    modules = [m for m in model.modules() if isinstance(m, DynamicShiftMax)]
    for m in modules:
        m.impl = impl
    return len(modules)


@contextlib.contextmanager
def use_shift_max_impl(impl: str | None) -> Iterator[None]:
    """Within the block every DynamicShiftMax runs with ``impl`` (None: each module's own)."""
    global _impl_override
    previous, _impl_override = _impl_override, (None if impl is None else _check_impl(impl))
    try:
        yield
    finally:
        _impl_override = previous


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with an h-sigmoid gate, the published code's SE ablation (x * gate(x))."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        from timm.layers import make_divisible  # on first use, as in the hyper-function's width above

        squeeze = make_divisible(channels // reduction, 4)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, channels),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]
