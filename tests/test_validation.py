"""Every invalid setting or input fails early with a ValueError that names the field, never later with a torch
shape error: config fields when the config is built, inputs at the start of `forward`."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_swin, tiny_vit
from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    SimMIMModel,
)


def vit(**overrides):
    return tiny_vit(**{"num_hidden_layers": 1, **overrides})


swin = tiny_swin


# ---------------------------------------------------------------------------------------------- config
CONFIG_ERRORS = {
    "image_size not a multiple of mask_patch_size": (
        vit(image_size=48, mask_patch_size=32),
        r"image_size=48.*mask_patch_size=32",
    ),
    "mask_patch_size not a multiple of patch_size": (
        vit(mask_patch_size=6, image_size=48),
        r"mask_patch_size=6.*patch_size=4",
    ),
    "image_size not a multiple of patch_size": (
        vit(image_size=30, mask_patch_size=10, patch_size=4),
        r"image_size=30.*patch_size=4",
    ),
    "swin window does not divide stage 0": (
        swin(window_size=6, image_size=40, mask_patch_size=8),  # grids 20, 10
        r"window_size=6.*stage 0",
    ),
    "swin window does not divide stage 1": (
        swin(window_size=8, image_size=96, patch_size=4, mask_patch_size=32),  # grids 24 (ok), 12 (not ok)
        r"window_size=8.*stage 1",
    ),
    "mask_ratio 0": (vit(mask_ratio=0), "mask_ratio"),
    "mask_ratio 1": (vit(mask_ratio=1), "mask_ratio"),
    "mask_ratio -0.1": (vit(mask_ratio=-0.1), "mask_ratio"),
    "mask_ratio 1.5": (vit(mask_ratio=1.5), "mask_ratio"),
    "mask_ratio not a number": (vit(mask_ratio="0.6"), "mask_ratio"),
    "unknown backbone": (vit(backbone="alexnet"), r"backbone='alexnet'"),
    "unknown loss_type": (vit(loss_type="l3"), r"loss_type='l3'"),
    "unknown mask_token_type": (vit(mask_token_type="random"), r"mask_token_type='random'"),
    "vit encoder_stride inconsistent": (vit(encoder_stride=16), r"encoder_stride=16"),
    "swin encoder_stride inconsistent": (swin(encoder_stride=2), r"encoder_stride=2"),
    "swin depths and num_heads lengths differ": (swin(num_heads=[1, 2, 4]), r"depths.*num_heads"),
    "vit hidden_size not divisible by heads": (vit(num_attention_heads=3), r"hidden_size=32.*num_attention_heads=3"),
    "swin stage width not divisible by heads": (swin(num_heads=[3, 2]), r"num_heads\[0\]=3"),
    "patch_size zero": (vit(patch_size=0), "patch_size"),
    "image_size not an integer": (vit(image_size=32.0), "image_size"),
    "vit zero heads": (vit(num_attention_heads=0), r"num_attention_heads=0 must be a positive integer"),
    "vit zero layers": (vit(num_hidden_layers=0), r"num_hidden_layers=0 must be a positive integer"),
    "swin zero window": (swin(window_size=0), r"window_size=0 must be a positive integer"),
    "swin no stages": (swin(depths=[], num_heads=[]), r"depths=\[\] and num_heads=\[\]"),
    "swin zero heads in a stage": (swin(num_heads=[1, 0]), r"num_heads\[1\]=0 must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_name_the_field(case):
    kwargs, message = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        SimMIMConfig(**kwargs)


def test_valid_configs_build():
    """The invalid cases above are one change away from valid ones (so each test isolates one field)."""
    valid = [
        vit(),
        swin(),
        vit(image_size=64, mask_patch_size=32),
        swin(window_size=8, image_size=64, patch_size=4, mask_patch_size=32),
        swin(window_size=5, image_size=40, mask_patch_size=8),
    ]
    for kwargs in valid:
        SimMIMConfig(**kwargs)
    # A stage whose grid is not larger than the window uses one window: no divisibility needed.
    config = SimMIMConfig(
        **swin(window_size=12, image_size=96, patch_size=4, depths=[2, 2, 2], num_heads=[1, 2, 4], mask_patch_size=32)
    )  # grids 24, 12, 6
    assert config.feature_grid_size == 6 and config.encoder_stride == 16


@pytest.mark.parametrize("case", ["mask_ratio 1.5", "unknown backbone", "swin window does not divide stage 1"])
def test_presets_and_saved_configs_are_validated(case, tmp_path):
    kwargs, message = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        SimMIMConfig.from_preset("vit-tiny-test" if kwargs["backbone"] != "swin" else "swin-tiny-test", **kwargs)
    # A hand-edited config.json fails when it is loaded, not when the model runs.
    good = SimMIMConfig(**(swin() if kwargs["backbone"] == "swin" else vit()))
    good.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data.pop("encoder_stride")  # derived from the edited geometry on load
    data.update(kwargs)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        SimMIMConfig.from_pretrained(tmp_path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="vit-tiny-test"):
        SimMIMConfig.from_preset("vit-gigantic")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=48, mask_patch_size=32, model_patch_size=4), "mask_patch_size"),
        (dict(input_size=64, mask_patch_size=32, model_patch_size=6), "patch_size"),
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.1), "mask_ratio"),
        (dict(mask_ratio=1.5), "mask_ratio"),
    ],
)
def test_mask_generator_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimMIMMaskGenerator(**kwargs)


# ---------------------------------------------------------------------------------------------- forward inputs
class Untouchable(torch.nn.Module):
    """Stands in for the patch embedding: any call means forward started real work before validating."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the encoder ran before the inputs were validated")


def guarded(model):
    base = model if isinstance(model, SimMIMModel) else model.simmim
    base.encoder.patch_embed = Untouchable()
    return model


def build(kind, backbone):
    config = SimMIMConfig(**(vit() if backbone == "vit" else swin()))
    model_class = {"mim": SimMIMForMaskedImageModeling, "base": SimMIMModel, "cls": SimMIMForImageClassification}[kind]
    return guarded(model_class(config).eval()), config


def good_mask(config, batch=2):
    generator = SimMIMMaskGenerator.from_config(config, seed=0)
    return torch.from_numpy(np.stack([generator() for _ in range(batch)]))


PIXEL_ERRORS = {
    "3-D": (lambda c: torch.randn(3, c.image_size, c.image_size), r"pixel_values must have shape"),
    "5-D": (lambda c: torch.randn(1, 2, 3, c.image_size, c.image_size), r"pixel_values must have shape"),
    "1 channel": (lambda c: torch.randn(2, 1, c.image_size, c.image_size), r"num_channels=3"),
    "4 channels": (lambda c: torch.randn(2, 4, c.image_size, c.image_size), r"num_channels=3"),
    "wrong size": (lambda c: torch.randn(2, 3, 64, 64), r"64x64.*image_size=32"),
    "not square": (lambda c: torch.randn(2, 3, 32, 36), r"image_size=32"),
    "missing": (lambda c: None, r"pixel_values is required"),
    "uint8 images": (
        lambda c: torch.zeros(2, 3, c.image_size, c.image_size, dtype=torch.uint8),
        r"pixel_values must be a float",
    ),
}


@pytest.mark.parametrize("case", sorted(PIXEL_ERRORS))
@pytest.mark.parametrize("kind", ["mim", "base", "cls"])
@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_pixel_values_errors(backbone, kind, case):
    model, config = build(kind, backbone)
    make, message = PIXEL_ERRORS[case]
    kwargs = {} if kind == "cls" else {"bool_masked_pos": good_mask(config)}
    with pytest.raises(ValueError, match=message):
        model(make(config), **kwargs)


MASK_ERRORS = {
    "too few patches": (lambda g, m: m.reshape(2, -1)[:, 1:], r"bool_masked_pos has shape \(2, (255|63)\)"),
    "grid not square": (lambda g, m: torch.zeros(2, g, g + 1, dtype=torch.bool), r"bool_masked_pos has shape"),
    "batch mismatch": (lambda g, m: m[:1], r"bool_masked_pos has shape \(1,"),
    "3 values": (lambda g, m: m.long() * 2, r"bool_masked_pos must hold only 0 and 1"),
    "negative": (lambda g, m: -m.long(), r"bool_masked_pos must hold only 0 and 1"),
    "float 0/1": (lambda g, m: m.float(), r"bool_masked_pos must be bool or 0/1 integers.*float32"),
    "4-D": (lambda g, m: m[:, None], r"bool_masked_pos has shape"),
}


@pytest.mark.parametrize("case", sorted(MASK_ERRORS))
@pytest.mark.parametrize("kind", ["mim", "base"])
@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_bool_masked_pos_errors(backbone, kind, case):
    model, config = build(kind, backbone)
    make, message = MASK_ERRORS[case]
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size)
    with pytest.raises(ValueError, match=message):
        model(pixel_values, bool_masked_pos=make(config.grid_size, good_mask(config)))


def test_mask_shape_error_says_what_is_expected():
    model, config = build("mim", "vit")
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 3, 32, 32), bool_masked_pos=torch.zeros(2, 16, dtype=torch.bool))
    message = str(error.value)
    assert "(batch, 64) or (batch, 8, 8)" in message and "patch_size=4" in message


def test_config_overrides_refuse_unknown_fields():
    from hf_simmim.training.runs import parse_config_overrides

    parsed = parse_config_overrides("mask_ratio=0.5,window_size=7,num_labels=3")
    assert parsed == dict(mask_ratio=0.5, window_size=7, num_labels=3)
    with pytest.raises(ValueError, match="mask_rato is not a SimMIMConfig field.*mask_ratio"):
        parse_config_overrides("mask_rato=0.5")


@pytest.mark.parametrize("model_class", ["SimMIMModel", "SimMIMForMaskedImageModeling", "SimMIMForImageClassification"])
def test_misspelt_forward_arguments_are_refused(model_class):
    import hf_simmim

    model = getattr(hf_simmim, model_class)(hf_simmim.SimMIMConfig.from_preset("vit-tiny-test", num_labels=2))
    pixel_values = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="unexpected arguments \\['bool_mask_pos'\\]"):
        model(pixel_values, bool_mask_pos=torch.zeros(1, 64, dtype=torch.bool))
