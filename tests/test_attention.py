"""Attention maps (`hf_simmim.reporting.attention`, `hf-simmim attention`): the maps of hand-made attention weights,
and of real models against transformers' own BEiT and Swin (our exports) run eagerly."""

import numpy as np
import pytest
import torch
from conftest import perturb_parameters_, tiny_swin, tiny_vit
from PIL import Image
from transformers import BeitModel, SwinModel

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMModel
from hf_simmim.cli import main as cli_main
from hf_simmim.convert import export_to_transformers
from hf_simmim.reporting.attention import (
    attention_overlay,
    heat_colours,
    last_block_attention,
    swin_window_attention,
    vit_cls_attention,
)


def test_vit_map_is_the_cls_row_averaged_over_heads():
    attention = torch.zeros(1, 2, 5, 5)  # one image, 2 heads, CLS + a 2x2 grid of patches
    attention[0, 0, 0, 3] = 1.0  # head 0: CLS looks only at patch 2, i.e. row 1, column 0
    attention[0, 1, 0, :] = 0.2  # head 1: CLS looks everywhere alike
    attention[0, :, 1:, :] = 0.7  # rows of the patch queries do not count
    expected = torch.tensor([[[0.1, 0.1], [0.6, 0.1]]])
    torch.testing.assert_close(vit_cls_attention(attention, 2), expected)


def windows_attending_to_key(shape, key_of_window):
    """`(B * nW, heads, N, N)` weights where every query of window w attends only to key `key_of_window[w]`."""
    attention = torch.zeros(shape)
    for window, key in enumerate(key_of_window):
        attention[window, :, :, key] = 1.0
    return attention


@pytest.mark.parametrize(
    "shift, hot_pixels",
    [
        # windows of 2x2 on a 4x4 grid, in order top-left, top-right, bottom-left, bottom-right; window w's key w is
        # its own (w // 2, w % 2) corner: (0, 0), (0, 3), (3, 0), (3, 3) of the grid.
        (0, [(0, 0), (0, 3), (3, 0), (3, 3)]),
        # the block cut its windows after rolling the grid by -1: every position moves one down and one right.
        (1, [(1, 1), (1, 0), (0, 1), (0, 0)]),
    ],
)
def test_swin_map_puts_each_window_back_where_it_lies(shift, hot_pixels):
    attention = windows_attending_to_key((4, 2, 4, 4), key_of_window=[0, 1, 2, 3])
    expected = torch.zeros(1, 4, 4)
    for row, column in hot_pixels:
        expected[0, row, column] = 1.0
    torch.testing.assert_close(swin_window_attention(attention, (4, 4), 2, shift), expected)
    # The same weights as (B, nW, heads, N, N) give the same map.
    torch.testing.assert_close(swin_window_attention(attention.view(1, 4, 2, 4, 4), (4, 4), 2, shift), expected)


def test_overlay_scales_each_map_and_blends_the_hot_colours():
    assert heat_colours(np.array([0.0, 1 / 3, 2 / 3, 1.0])).tolist() == [
        [0, 0, 0],
        [255, 0, 0],
        [255, 255, 0],
        [255, 255, 255],
    ]
    images = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    maps = np.array([[[0.2, 0.2], [0.2, 0.7]]])  # scaled to 0 everywhere but 1 at the bottom-right patch
    out = attention_overlay(images, maps, opacity=0.5)
    assert (out[0, 2:, 2:] == 178).all()  # 0.5 * 100 + 0.5 * 255, rounded
    assert (out[0, :2] == 50).all() and (out[0, 2:, :2] == 50).all()  # 0.5 * 100 + 0.5 * black


def transformers_attention(model, folder, reference_class, pixel_values):
    """The last block's attention weights of transformers' own class holding `model` (export), run eagerly."""
    export_to_transformers(model, str(folder))
    reference = reference_class.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return reference(pixel_values, output_attentions=True).attentions[-1]


@pytest.mark.parametrize("model_class", [SimMIMForMaskedImageModeling, SimMIMForImageClassification])
def test_vit_map_matches_transformers_beit(model_class, tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(model_class(SimMIMConfig(**tiny_vit()))).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    weights = transformers_attention(model.base_model, tmp_path / "hf", BeitModel, pixel_values)
    expected = weights[:, :, 0, 1:].mean(dim=1).reshape(2, 8, 8)
    torch.testing.assert_close(last_block_attention(model, pixel_values), expected, atol=1e-5, rtol=0)


def test_swin_map_matches_transformers_swin(tmp_path):
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMModel(SimMIMConfig(**tiny_swin()))).eval()
    block = model.encoder.layers[-1].blocks[-1]
    assert block.shift and block.resolution[0] > block.window  # premise: the last block's windows are shifted
    pixel_values = torch.randn(2, 3, 32, 32)
    weights = transformers_attention(model, tmp_path / "hf", SwinModel, pixel_values)
    expected = swin_window_attention(weights, block.resolution, block.window, block.shift)
    torch.testing.assert_close(last_block_attention(model, pixel_values), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fields", [tiny_vit(), tiny_swin()], ids=["vit", "swin"])
def test_cli_attention_draws_the_images_and_their_maps(fields, tmp_path, capsys):
    torch.manual_seed(0)
    perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig(**fields))).save_pretrained(tmp_path / "ckpt")
    paths = []
    for seed in range(2):
        paths.append(str(tmp_path / f"image{seed}.png"))
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(paths[-1])
    output = tmp_path / "maps" / "attention.png"
    assert cli_main(["attention", str(tmp_path / "ckpt"), *paths, "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    picture = Image.open(output)
    assert picture.format == "PNG"
    assert picture.height >= 2 * 96 and picture.width >= 2 * 96  # two rows of two 32-px panels enlarged 3x
