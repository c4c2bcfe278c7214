"""Fine-tuning recipe: layer-wise lr decay groups, position-table interpolation, mixup/cutmix, probing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from hf_simmim.training.finetuning import MixupCutmix
from hf_simmim.training.optim import layer_decay_parameter_groups
from hf_simmim.training.probing import knn_scores, linear_probe, pooled_features


def test_layer_decay_groups_put_the_peak_learning_rate_first():
    """The `Trainer` logs the first group's learning rate: it must be the head's (the peak), not the embeddings'.
    Which layer and decay each parameter gets is checked against the official code in test_official_param_groups."""
    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit-tiny-test", num_labels=10))
    groups = layer_decay_parameter_groups(model, learning_rate=1e-3, weight_decay=0.05, layer_decay=0.5)
    assert groups[0]["lr"] == 1e-3  # the peak: the learning rate itself, undecayed
    assert [group["lr"] for group in groups] == sorted((group["lr"] for group in groups), reverse=True)
    names = [name for group in groups for name in group["names"]]
    assert sorted(names) == sorted(name for name, _ in model.named_parameters())  # each parameter once


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
    _, path = swin_w6_checkpoint
    model, info = SimMIMForImageClassification.from_pretrained(
        path, image_size=224, window_size=7, num_labels=5, output_loading_info=True
    )
    assert not info["mismatched_keys"]
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}
    for stage in model.simmim.encoder.layers:  # the values themselves: test_official_interpolation.py
        new = stage.blocks[0].attn.relative_position_bias_table.detach()
        assert new.shape == (13 * 13, 1)
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
        seq = model.simmim.encoder.blocks[0](seq, model.simmim.encoder.rel_pos_bias())[0]
        assert torch.allclose(first, seq[:, 1:].mean(1), atol=1e-6)
        last = pooled_features(model, x)
        assert torch.allclose(last, model.simmim(x).last_hidden_state[:, 1:].mean(1), atol=1e-6)
    with pytest.raises(ValueError, match="block"):
        pooled_features(model, x, block=3)


@pytest.mark.parametrize("preset", ["resnet-tiny-test", "convnextv2-tiny-test"])
def test_pooled_features_of_a_cnn_average_its_stage_map(preset):
    config = SimMIMConfig.from_preset(preset)
    model = SimMIMForMaskedImageModeling(config).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = model.simmim.encoder.stem(x)
        first_stage = model.simmim.encoder.stages[0](stem)
        assert torch.allclose(pooled_features(model, x, block=1), first_stage.mean(dim=(2, 3)), atol=1e-5)
        final = model.simmim(x, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(pooled_features(model, x), final.mean(dim=(2, 3)), atol=1e-5)


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
    with torch.no_grad():
        source.simmim.encoder.rel_pos_bias.relative_position_bias_table.normal_()  # initialised to zeros
    source.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(tmp_path, image_size=64, num_labels=2, output_loading_info=True)
    assert not info["mismatched_keys"]
    old_table = source.simmim.encoder.rel_pos_bias.relative_position_bias_table.detach()
    new_table = model.simmim.encoder.rel_pos_bias.relative_position_bias_table.detach()
    assert new_table.shape == ((2 * 16 - 1) ** 2 + 3, 2)  # the values themselves: test_official_interpolation.py
    assert torch.equal(new_table[-3:], old_table[-3:])  # the CLS rows are copied, not interpolated
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
