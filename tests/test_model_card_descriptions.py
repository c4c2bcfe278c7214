"""The model card names each backbone, its target and its decoder (hand-written expectations per preset)."""

import pytest

from hf_simmim import SimMIMConfig
from hf_simmim.reporting.model_card import describe_architecture, describe_decoder, describe_target


@pytest.mark.parametrize("preset, architecture, target, decoder", [
    ("swinv2-base-window14-224",
     "SwinV2 (embed dim 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], window 14, pretrained windows [12, 12, 12, 6])",
     "the raw pixels", "one 1x1 convolution + PixelShuffle(32)"),
    ("swinv2-base-window12-192",
     "SwinV2 (embed dim 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], window 12)",
     "the pixels standardised over their 47-pixel neighbourhood", "one 1x1 convolution + PixelShuffle(32)"),
    ("swin-base-window6-192",
     "Swin (embed dim 128, depths [2, 2, 18, 2], heads [4, 8, 16, 32], window 6)",
     "the raw pixels", "one 1x1 convolution + PixelShuffle(32)"),
    ("resnet50-224",
     "ResNet (widths [256, 512, 1024, 2048], depths [3, 4, 6, 3], sparse masking)",
     "the pixels standardised within each 32-pixel square",
     "a light hierarchical decoder over the stage outputs (SparK-style, width 768)"),
])
def test_card_describes_backbone_target_and_decoder(preset, architecture, target, decoder):
    config = SimMIMConfig.from_preset(preset)
    assert describe_architecture(config) == architecture
    assert describe_target(config) == target
    assert describe_decoder(config) == decoder


def test_the_local_target_names_its_neighbourhood():
    config = SimMIMConfig.from_preset("swinv2-tiny-test", norm_target="local", norm_target_patch_size=5)
    assert describe_target(config) == "the pixels standardised over their 5-pixel neighbourhood"
