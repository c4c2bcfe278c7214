"""Relative position bias tables resized as the official fine-tuning resizes them (`remap_pretrained_keys_swin` /
`remap_pretrained_keys_vit`, geometric-progression cubic fit), against the tables the official functions produced
(`../shared/fixtures/official_recipe/interpolation_{swin,vit}.*`, see its README, "Relative position bias
interpolation"): directly, and through `from_pretrained` at another window or image size."""

import json

import pytest
import torch
from conftest import max_abs_diff
from safetensors.torch import load_file

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from hf_simmim.models.modeling_resize import geometric_source_offsets, resize_position_table

ATOL = 1e-6  # measured: 0 (the same spline as the official interp2d, in float64, cast to float32)
SWIN_BLOCKS = ("layers.0.blocks.0", "layers.0.blocks.1")
VIT_BLOCKS = ("blocks.0", "blocks.1")


def load_oracle(official_recipe_dir, backbone):
    with open(official_recipe_dir / f"interpolation_{backbone}.json") as f:
        notes = json.load(f)
    return notes, load_file(official_recipe_dir / f"interpolation_{backbone}.safetensors")


def swin_tables(model):
    blocks = model.simmim.encoder.layers[0].blocks
    return {f"layers.0.blocks.{j}": block.attn.relative_position_bias_table for j, block in enumerate(blocks)}


@pytest.mark.parametrize("backbone", ["swin", "vit"])
def test_source_offsets_are_the_official_geometric_progression(official_recipe_dir, backbone):
    notes, _ = load_oracle(official_recipe_dir, backbone)
    offsets = geometric_source_offsets(notes["src_size"], notes["dst_size"])
    assert offsets == notes["original_positions_x"]


def test_swin_table_fit_matches_official(official_recipe_dir):
    _, tensors = load_oracle(official_recipe_dir, "swin")
    for block in SWIN_BLOCKS:
        key = f"{block}.attn.relative_position_bias_table"
        expected = tensors[f"output.{key}"]
        resized = resize_position_table("simmim.encoder." + key, tensors[f"input.{key}"], tuple(expected.shape))
        diff = max_abs_diff(resized, expected)
        print(f"[interpolation] swin {block}: max abs diff {diff:.3g}")
        assert resized.shape == expected.shape and diff <= ATOL


def test_vit_table_fit_matches_official_keeping_cls_rows(official_recipe_dir):
    _, tensors = load_oracle(official_recipe_dir, "vit")
    shared = tensors["input.rel_pos_bias.relative_position_bias_table"]
    for block in VIT_BLOCKS:
        expected = tensors[f"output.{block}.attn.relative_position_bias_table"]
        key = f"simmim.encoder.{block}.rel_pos_bias.relative_position_bias_table"
        resized = resize_position_table(key, shared, tuple(expected.shape))
        diff = max_abs_diff(resized, expected)
        print(f"[interpolation] vit {block}: max abs diff {diff:.3g}")
        assert resized.shape == expected.shape and diff <= ATOL
        assert torch.equal(resized[-3:], shared[-3:])


def test_swin_checkpoint_loaded_at_another_window_matches_official(official_recipe_dir, tmp_path):
    """The official pretrained model (img 48, embed 16, depths [2], heads [4], window 6) saved with the oracle's
    tables, loaded as the official fine-tuning model (img 56, window 7, 10 classes)."""
    _, tensors = load_oracle(official_recipe_dir, "swin")
    config = SimMIMConfig(
        backbone="swin", image_size=48, patch_size=4, embed_dim=16, depths=[2], num_heads=[4], window_size=6,
        mask_patch_size=16,
    )
    source = SimMIMForMaskedImageModeling(config)
    with torch.no_grad():
        for block, table in swin_tables(source).items():
            table.copy_(tensors[f"input.{block}.attn.relative_position_bias_table"])
    source.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(
        tmp_path, image_size=56, window_size=7, mask_patch_size=8, num_labels=10, output_loading_info=True
    )
    assert not info["mismatched_keys"]
    for block, table in swin_tables(model).items():
        diff = max_abs_diff(table, tensors[f"output.{block}.attn.relative_position_bias_table"])
        print(f"[interpolation] swin from_pretrained {block}: max abs diff {diff:.3g}")
        assert diff <= ATOL


def test_vit_checkpoint_loaded_at_another_image_size_matches_official(official_recipe_dir, tmp_path):
    """The official pretrained ViT (img 64, patch 8, shared table) saved with the oracle's table, loaded as the
    official fine-tuning ViT (img 80, a table per block, mean pooling): every block starts from the resized table."""
    _, tensors = load_oracle(official_recipe_dir, "vit")
    config = SimMIMConfig(
        backbone="vit", image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        use_absolute_position_embeddings=False, use_relative_position_bias=False,
        use_shared_relative_position_bias=True, layer_scale_init_value=0.1,
    )
    source = SimMIMForMaskedImageModeling(config)
    with torch.no_grad():
        source.simmim.encoder.rel_pos_bias.relative_position_bias_table.copy_(
            tensors["input.rel_pos_bias.relative_position_bias_table"]
        )
    source.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(
        tmp_path, image_size=80, mask_patch_size=16, num_labels=10, use_relative_position_bias=True,
        use_shared_relative_position_bias=False, use_mean_pooling=True, output_loading_info=True,
    )
    assert not info["mismatched_keys"] and not any("rel_pos_bias" in key for key in info["missing_keys"])
    for i, block in enumerate(model.simmim.encoder.blocks):
        expected = tensors[f"output.blocks.{i}.attn.relative_position_bias_table"]
        diff = max_abs_diff(block.rel_pos_bias.relative_position_bias_table, expected)
        print(f"[interpolation] vit from_pretrained blocks.{i}: max abs diff {diff:.3g}")
        assert diff <= ATOL
