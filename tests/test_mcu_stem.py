"""The microcontroller form's separable stem: the stem's factorized pair kept unmerged, the pixel normalization
folded into its first conv (``deploy.pixel_input.PixelSeparableStem``), trainable for ``--qat``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import micronet_torch
from micronet_torch.deploy import convert_to_deploy
from micronet_torch.deploy.pixel_input import PixelInput, PixelSeparableStem, PixelStem, mcu_graph
from micronet_torch.deploy.qat import fake_quant_weight, qat_net, restore_qat
from micronet_torch.tools.bench import trained_like

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL = 2e-5  # of max |logits|, float


@pytest.fixture(scope="module")
def m0() -> nn.Module:
    torch.manual_seed(0)
    return trained_like(micronet_torch.create_model("micronet_m0", num_classes=10)).eval()


def _pixels_and_images(n: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randint(0, 256, (n, height, width, 3), generator=torch.Generator().manual_seed(seed)).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    return pixels, (pixels.permute(0, 3, 1, 2) / 255 - mean) / std


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def test_separable_stem_keeps_only_the_stem_pair_unmerged(m0: nn.Module) -> None:
    """``stem="separable"`` (the default): the stem's 3 x 1 / 1 x 3 pair stays two convs, every other factorized
    pair is merged as with ``stem="merged"``, and an unknown choice is refused."""
    merged = convert_to_deploy(m0, backend="mcu", stem="merged").features
    separable = convert_to_deploy(m0, backend="mcu", stem="separable").features
    conv1, conv2 = separable[0], separable[1]
    assert (conv1.kernel_size, conv1.stride, conv1.groups) == ((3, 1), (2, 1), 1)
    assert (conv2.kernel_size, conv2.stride, conv2.groups) == ((1, 3), (1, 2), conv1.out_channels)
    assert merged[0].kernel_size == (3, 3) and len(separable) == len(merged) + 1
    assert [type(m) for m in separable[2:]] == [type(m) for m in merged[1:]]
    assert convert_to_deploy(m0, backend="mcu").features[0].kernel_size == (3, 1)
    with pytest.raises(ValueError, match="stem"):
        convert_to_deploy(m0, backend="mcu", stem="wrong")


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 64), (64, 64), (33, 33), (32, 33)])
def test_separable_pixel_stem_is_exact(m0: nn.Module, height: int, width: int) -> None:
    """Camera pixels in, the normalization folded into the pair's first conv (4 x 1 weights, the second 1 x 4, the
    border map a (1, C, H / 2, 1) vector): equal to the eager model on the normalized image; an odd size takes the
    unfolded path, also exact."""
    pixels, x = _pixels_and_images(2, height, width)
    graph = mcu_graph(m0, MEAN, STD, stem="separable")
    stem = graph.body.features[0]
    assert isinstance(graph, PixelInput) and graph.folded and isinstance(stem, PixelSeparableStem)
    assert stem.weight.shape[-2:] == (4, 1) and stem.weight2.shape[-2:] == (1, 4)
    assert torch.all(stem.weight[:, :, 3] == 0) and torch.all(stem.weight2[:, :, :, 3] == 0)
    with torch.no_grad():
        ref = m0(x)
        assert _rel(graph(pixels), ref) <= TOL
        if height % 2 == 0:
            emap = stem.offset_map(height)
            assert emap.shape == (1, stem.conv1.out_channels, height // 2, 1)
            top = float(emap[:, :, 0].abs().max())  # the top row only (elsewhere the bias's float32 rounding)
            assert top > 0 and float(emap[:, :, 1:].abs().max()) <= 1e-6 * top


def test_merged_stem_still_folds(m0: nn.Module) -> None:
    """The merged stem (``stem="merged"``) keeps its ``PixelStem``."""
    pixels, x = _pixels_and_images(2, 32, 32)
    graph = mcu_graph(m0, MEAN, STD, stem="merged")
    assert isinstance(graph.body.features[0], PixelStem)
    with torch.no_grad():
        assert _rel(graph(pixels), m0(x)) <= TOL


def test_trainable_separable_stem_equals_the_fixed_one_and_trains(m0: nn.Module) -> None:
    """The trainable stem (``--qat``) computes the fixed one's values, passes gradients to both convs of the pair
    (not to the normalization), and ``frozen`` stores the rounded folded 4 x 1 and rounded 1 x 4 weights."""
    pixels, _ = _pixels_and_images(2, 32, 32, seed=1)
    deploy = convert_to_deploy(m0, backend="mcu", stem="separable")
    fixed = PixelInput(deploy, MEAN, STD, fold_stem=True)
    trainable = PixelInput(deploy, MEAN, STD, fold_stem=True, trainable_stem=True)
    stem = trainable.body.features[0]
    assert isinstance(stem, PixelSeparableStem) and stem.trainable
    with torch.no_grad():
        assert torch.allclose(trainable(pixels), fixed(pixels), rtol=0, atol=1e-5)
    stem.conv1.requires_grad_(True)
    stem.conv2.requires_grad_(True)
    trainable.norm.requires_grad_(False)  # the data's normalization: constants (as qat_net has it)
    trainable(pixels).square().mean().backward()
    assert float(stem.conv1.weight.grad.abs().sum()) > 0 and float(stem.conv2.weight.grad.abs().sum()) > 0
    assert float(stem.conv1.bias.grad.abs().sum()) > 0 and stem.norm.weight.grad is None
    frozen = stem.frozen(fake_quant_weight)
    assert not frozen.trainable
    w1, _, w2 = stem.folded(torch.float32)
    assert torch.equal(frozen.weight, fake_quant_weight(w1.detach()))
    assert torch.equal(frozen.weight2, fake_quant_weight(w2.detach()))


def test_qat_graph_of_the_separable_stem_restores_by_its_keys(m0: nn.Module) -> None:
    """``qat_net(..., stem="separable")`` trains the pixel graph with the separable stem (one more requantizing op
    than the merged one: the pair's second conv), its float graph is what the file exports, and ``restore_qat``
    rebuilds each form, pixel graph or not, from its state dict's keys."""
    norm = (MEAN, STD)
    qnet = qat_net(m0, 32, 3, norm, stem="separable")
    merged = qat_net(m0, 32, 3, norm, stem="merged")
    assert isinstance(qnet.graph.body.features[0], PixelSeparableStem) and len(qnet.fq) == len(merged.fq) + 1
    pixels, x = _pixels_and_images(2, 32, 32, seed=2)
    with torch.no_grad():
        assert _rel(qnet.graph(pixels), m0(x)) <= TOL
    exported = qnet.float_graph()
    assert isinstance(exported.body.features[0], PixelSeparableStem) and not exported.body.features[0].trainable
    for state, kind in ((qnet.state_dict(), PixelSeparableStem), (merged.state_dict(), PixelStem)):
        restored = restore_qat(m0, state, 32, 3, norm)
        assert restored.pixels and type(restored.graph.body.features[0]) is kind
    plain = restore_qat(m0, qat_net(m0, 32, 3, None, stem="separable").state_dict(), 32, 3, norm)
    assert not plain.pixels and plain.graph.features[0].kernel_size == (3, 1)
    plain = restore_qat(m0, qat_net(m0, 32, 3, None, stem="merged").state_dict(), 32, 3, norm)
    assert not plain.pixels and plain.graph.features[0].kernel_size == (3, 3)
