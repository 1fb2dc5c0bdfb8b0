"""Baselines: MobileNetV3-Small at any width, matched to MicroNet's MAdds, and the shared model factory."""

import pytest
import torch

import micronet_torch
from micronet_torch.models import baseline_name, build_model, match_width, mobilenetv3_small


def test_mobilenetv3_small_width_scales_cost():
    small = micronet_torch.profile(mobilenetv3_small(0.35, num_classes=10), img_size=32).madds
    big = micronet_torch.profile(mobilenetv3_small(0.75, num_classes=10), img_size=32).madds
    assert small < big
    assert build_model(baseline_name(0.35), num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_match_width_hits_micronet_m0_within_ten_percent():
    target = micronet_torch.profile(micronet_torch.create_model("micronet_m0", num_classes=10), img_size=32).madds
    width, madds = match_width(target, img_size=32, num_classes=10)
    assert abs(madds / target - 1) <= 0.10 and 0.05 <= width <= 1.0
    with pytest.raises(ValueError, match="no MobileNetV3-Small width matches"):
        match_width(10_000, img_size=32, num_classes=10)


def test_build_model_names():
    assert isinstance(build_model("micronet_m0", num_classes=4), micronet_torch.MicroNet)
    assert build_model("resnet10t", num_classes=4)(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown model 'nonet'"):
        build_model("nonet")
    with pytest.raises(ValueError, match="only supported for MicroNets"):
        build_model("mobilenetv3_small_w0.5", pretrained=True)
