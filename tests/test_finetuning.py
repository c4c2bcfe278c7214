"""Fine-tuning recipe: layer-wise lr decay groups, position-table interpolation, mixup/cutmix, probing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from hf_simmim.training.finetuning import MixupCutmix
from hf_simmim.training.optim import layer_decay_parameter_groups, layer_id
from hf_simmim.training.probing import knn_scores, linear_probe, pooled_features


def _group_of(groups):
    out = {}
    for group in groups:
        for name in group["names"]:
            assert name not in out, f"{name} is in two groups"
            out[name] = group
    return out


def test_vit_layer_decay_groups_match_official_ids_and_scales():
    config = SimMIMConfig.from_preset("vit-tiny-test", num_labels=10)  # 2 blocks: ids 0..3
    model = SimMIMForImageClassification(config)
    d = 0.5
    ordered = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=d)
    assert ordered[0]["layer_id"] == 3 and ordered[0]["lr"] == 1e-3  # first group (what the Trainer logs): the peak
    groups = _group_of(ordered)
    assert set(groups) == {n for n, _ in model.named_parameters()}
    expected = {  # name: (layer id, scale = d ** (L + 1 - id), weight decay)
        "simmim.encoder.cls_token": (0, d**3, 0.0),
        "simmim.encoder.patch_embed.proj.weight": (0, d**3, 0.05),
        "simmim.encoder.patch_embed.proj.bias": (0, d**3, 0.0),
        "simmim.encoder.blocks.0.attn.qkv.weight": (1, d**2, 0.05),
        "simmim.encoder.blocks.0.gamma_1": (1, d**2, 0.0),
        "simmim.encoder.blocks.1.norm1.weight": (2, d, 0.0),
        "simmim.encoder.blocks.1.mlp.fc2.weight": (2, d, 0.05),
        "simmim.encoder.rel_pos_bias.relative_position_bias_table": (3, 1.0, 0.0),
        "simmim.pooler.fc_norm.weight": (3, 1.0, 0.0),
        "classifier.weight": (3, 1.0, 0.05),
        "classifier.bias": (3, 1.0, 0.0),
    }
    for name, (lid, scale, wd) in expected.items():
        group = groups[name]
        assert (group["layer_id"], group["weight_decay"]) == (lid, wd), name
        assert group["lr"] == pytest.approx(1e-3 * scale), name


def _official_swin_layer(name, num_layers, depths):
    """microsoft/SimMIM optimizer.py get_swin_layer, on official (encoder-relative) names."""
    if name in ("mask_token",):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("layers"):
        layer = int(name.split(".")[1])
        block = name.split(".")[3]
        if block in ("reduction", "norm"):
            return sum(depths[: layer + 1])
        return sum(depths[:layer]) + int(block) + 1
    return num_layers - 1


def test_swin_layer_ids_match_official_function():
    config = SimMIMConfig.from_preset("swin-tiny-test", depths=[2, 3], num_heads=[1, 2], num_labels=4)
    model = SimMIMForImageClassification(config)
    total = sum(config.depths) + 2
    for name, _ in model.named_parameters():
        if name.startswith("simmim.encoder."):
            official = _official_swin_layer(name[len("simmim.encoder.") :], total, config.depths)
        else:
            official = total - 1
        assert layer_id(name, config) == official, name
    assert layer_id("simmim.encoder.layers.0.downsample.reduction.weight", config) == 2
    assert layer_id("simmim.encoder.layers.1.blocks.2.attn.qkv.weight", config) == 5
    assert layer_id("simmim.encoder.norm.weight", config) == 6


def test_layer_decay_rejects_bad_decay():
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit-tiny-test", num_labels=2))
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_parameter_groups(model, 1e-3, layer_decay=1.5)


@pytest.fixture
def swin_w6_checkpoint(tmp_path):
    config = SimMIMConfig(
        backbone="swin", image_size=192, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1], window_size=6, drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config)
    # a table that depends on the vertical offset only: the interpolated one must too (axes not swapped)
    for stage in model.simmim.encoder.layers:
        table = stage.blocks[0].attn.relative_position_bias_table
        dy = torch.arange(11, dtype=torch.float32).repeat_interleave(11)
        table.data.copy_(dy.unsqueeze(1).expand_as(table))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_relative_position_bias_interpolated_when_window_grows(swin_w6_checkpoint):
    source, path = swin_w6_checkpoint
    model, info = SimMIMForImageClassification.from_pretrained(
        path, image_size=224, window_size=7, num_labels=5, output_loading_info=True
    )
    assert not info["mismatched_keys"]
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    for old_stage, new_stage in zip(source.simmim.encoder.layers, model.simmim.encoder.layers):
        old = old_stage.blocks[0].attn.relative_position_bias_table.detach()
        new = new_stage.blocks[0].attn.relative_position_bias_table.detach()
        assert new.shape == (13 * 13, 1)
        expected = F.interpolate(old.T.reshape(1, 1, 11, 11), size=(13, 13), mode="bicubic", align_corners=False)
        assert torch.allclose(new, expected.reshape(1, -1).T, atol=1e-6)
        grid = new.reshape(13, 13)
        assert torch.allclose(grid, grid[:, :1].expand(13, 13))  # still constant along dx
        assert (grid[1:, 0] > grid[:-1, 0]).all()  # still increasing along dy
    logits = model(torch.randn(2, 3, 224, 224)).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_mim_checkpoint_loads_into_classifier_dropping_decoder_and_mask_token(tmp_path):
    for preset in ("vit-tiny-test", "swin-tiny-test"):
        source = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset))
        source.save_pretrained(tmp_path / preset)
        model, info = SimMIMForImageClassification.from_pretrained(
            tmp_path / preset, num_labels=3, output_loading_info=True
        )
        expected_missing = {"classifier.weight", "classifier.bias"}
        if preset.startswith("vit"):
            expected_missing |= {"simmim.pooler.fc_norm.weight", "simmim.pooler.fc_norm.bias"}
        assert info["missing_keys"] == expected_missing
        loaded = dict(model.named_parameters())
        for name, value in source.named_parameters():
            if name in loaded:
                assert torch.equal(loaded[name], value), name
            else:
                assert name.startswith("decoder.") or "mask_token" in name or name.startswith("simmim.encoder.norm."), name


def test_mixup_cutmix_soft_targets():
    batch = {"pixel_values": torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4), "labels": torch.tensor([0, 2])}
    mixup = MixupCutmix(num_classes=3, mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, rng=np.random.default_rng(0))
    out = mixup(batch)
    lam = float(out["labels"][0, 0])
    assert torch.allclose(out["labels"].sum(1), torch.ones(2))
    assert torch.allclose(out["pixel_values"][0], lam * batch["pixel_values"][0] + (1 - lam) * batch["pixel_values"][1])
    cutmix = MixupCutmix(num_classes=3, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1, rng=np.random.default_rng(1))
    out = cutmix(batch)
    pasted = (out["pixel_values"][0] != batch["pixel_values"][0]).any(0).float().mean().item()
    off = 0.1 / 3
    # label 0 keeps (1 - pasted area) of its smoothed one-hot, label 2 gets the rest
    assert out["labels"][0, 0].item() == pytest.approx((1 - pasted) * (1 - 0.1 + off) + pasted * off)
    assert out["labels"][0, 2].item() == pytest.approx((1 - pasted) * off + pasted * (1 - 0.1 + off))


def test_classifier_accepts_soft_targets():
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit-tiny-test", num_labels=3))
    x = torch.randn(2, 3, 32, 32)
    hard = model(x, labels=torch.tensor([0, 2])).loss
    soft = model(x, labels=F.one_hot(torch.tensor([0, 2]), 3).float()).loss
    assert torch.allclose(hard, soft, atol=1e-6)


def test_pooled_features_choose_block():
    config = SimMIMConfig.from_preset("vit-tiny-test")
    model = SimMIMForMaskedImageModeling(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = pooled_features(model, x, block=1)
        tokens = model.simmim.encoder.patch_embed(x)
        cls = model.simmim.encoder.cls_token.expand(2, -1, -1)
        seq = torch.cat([cls, tokens], 1)
        seq = model.simmim.encoder.blocks[0](seq, model.simmim.encoder.rel_pos_bias())
        assert torch.allclose(first, seq[:, 1:].mean(1), atol=1e-6)
        last = pooled_features(model, x)
        assert torch.allclose(last, model.simmim(x).last_hidden_state[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="block"):
        pooled_features(model, x, block=3)


def test_knn_and_linear_probe_separate_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=generator) * 4
    labels = torch.arange(3).repeat_interleave(30)
    features = centers[labels] + torch.randn(90, 16, generator=generator)
    test_labels = torch.arange(3).repeat_interleave(10)
    test = centers[test_labels] + torch.randn(30, 16, generator=generator)
    assert (knn_scores(features, labels, test, 3, k=5).argmax(1) == test_labels).float().mean() == 1.0
    logits = linear_probe(features, labels, test, 3, epochs=50, lr=1e-2)
    assert (logits.argmax(1) == test_labels).float().mean() == 1.0
    # k-NN with k=1 returns the label of the single most similar training feature
    nearest = (F.normalize(test, dim=1) @ F.normalize(features, dim=1).T).argmax(1)
    assert torch.equal(knn_scores(features, labels, test, 3, k=1).argmax(1), labels[nearest])


def test_vit_loaded_at_another_image_size_interpolates_cls_rows_intact(tmp_path):
    config = SimMIMConfig.from_preset("vit-tiny-test", use_absolute_position_embeddings=True)
    torch.manual_seed(0)
    source = SimMIMForMaskedImageModeling(config)
    source.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(tmp_path, image_size=64, num_labels=2, output_loading_info=True)
    assert not info["mismatched_keys"]
    old_table = source.simmim.encoder.rel_pos_bias.relative_position_bias_table.detach()
    new_table = model.simmim.encoder.rel_pos_bias.relative_position_bias_table.detach()
    assert new_table.shape == ((2 * 16 - 1) ** 2 + 3, 2)
    assert torch.equal(new_table[-3:], old_table[-3:])  # the CLS rows are copied, not interpolated
    expected = F.interpolate(old_table[:-3].T.reshape(1, 2, 15, 15), size=(31, 31), mode="bicubic", align_corners=False)
    assert torch.allclose(new_table[:-3], expected.reshape(2, -1).T, atol=1e-6)
    old_pos = source.simmim.encoder.pos_embed.detach()
    new_pos = model.simmim.encoder.pos_embed.detach()
    assert new_pos.shape == (1, 1 + 16 * 16, 64)
    assert torch.equal(new_pos[:, 0], old_pos[:, 0])  # the CLS position is kept
    grid = old_pos[0, 1:].T.reshape(1, 64, 8, 8)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).reshape(64, -1).T
    assert torch.allclose(new_pos[0, 1:], expected, atol=1e-6)
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 2)


def test_shared_table_seeds_per_block_tables_as_official_vit_finetuning(tmp_path):
    config = SimMIMConfig.from_preset("vit-tiny-test")  # shared table, as the official ViT pretraining
    torch.manual_seed(0)
    source = SimMIMForMaskedImageModeling(config)
    with torch.no_grad():
        source.simmim.encoder.rel_pos_bias.relative_position_bias_table.normal_()
    source.save_pretrained(tmp_path)
    shared = source.simmim.encoder.rel_pos_bias.relative_position_bias_table
    model, info = SimMIMForImageClassification.from_pretrained(
        tmp_path, num_labels=2, use_relative_position_bias=True, use_shared_relative_position_bias=False,
        output_loading_info=True,
    )
    assert model.simmim.encoder.rel_pos_bias is None
    for block in model.simmim.encoder.blocks:
        assert torch.equal(block.rel_pos_bias.relative_position_bias_table, shared)
    assert not any("rel_pos_bias" in key for key in info["missing_keys"] | info["unexpected_keys"])
    # the same function as the pretrained encoder with its shared table (the classifier head aside)
    x = torch.randn(2, 3, 32, 32)
    pretrained = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=2).eval()
    model.eval()
    with torch.no_grad():
        a = model.simmim(x, output_hidden_states=True).hidden_states[-1]
        b = pretrained.simmim(x, output_hidden_states=True).hidden_states[-1]
    assert torch.allclose(a, b, atol=1e-5)
