"""The SwinV2 encoder as a transformers model and as the official code builds it: the official initialisation, SDPA
against the eager kernel, attention weights, gradient checkpointing, window clamping, the coordinate table and logit
scale clamp, the normalised target, and fine-tuning at a larger window (no table to interpolate)."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import max_abs_diff, perturb_parameters_, tiny_swinv2

from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    SimMIMModel,
    simmim_loss,
)
from hf_simmim.models.modeling_simmim import normalize_locally
from hf_simmim.models.modeling_swinv2 import swinv2_relative_coords_table

ATOL = 1e-5


def perturbed(model_class, **overrides):
    torch.manual_seed(0)
    return perturb_parameters_(model_class(SimMIMConfig(**tiny_swinv2(**overrides)))).eval()


def inputs(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, config.image_size, config.image_size, generator=generator)
    masks = SimMIMMaskGenerator.from_config(config, seed=seed)
    return pixel_values, torch.stack([torch.from_numpy(masks()) for _ in range(2)])


# ---------------------------------------------------------------------------------------------- initialisation
def test_official_initialisation():
    """microsoft/Swin-Transformer `SwinTransformerV2`: Linear weights trunc_normal(std .02), biases 0, LayerNorms 1/0
    except every block's post-norms (`_init_respostnorm`: 0/0), logit scale log(10), q/v biases 0; the mask token
    std .02; the patch-embedding conv keeps PyTorch's init (U(+-1/sqrt(fan_in)))."""
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**tiny_swinv2(embed_dim=32)))
    params = dict(model.named_parameters())
    blocks = [name for name in params if name.endswith("attn.logit_scale")]
    assert len(blocks) == 4
    for name, value in params.items():
        if ".norm1." in name or ".norm2." in name:
            assert torch.count_nonzero(value) == 0, name
        elif name.endswith("logit_scale"):
            torch.testing.assert_close(value, torch.full_like(value, math.log(10.0)), rtol=0, atol=0)
        elif name.endswith(("q_bias", "v_bias", "attn.proj.bias", "fc1.bias", "fc2.bias", "cpb_mlp.0.bias")):
            assert torch.count_nonzero(value) == 0, name
        elif name.endswith("norm.weight"):  # patch embedding, patch merging and final norms
            assert torch.equal(value, torch.ones_like(value)), name
    for name in ("layers.0.blocks.0.attn.cpb_mlp.0.weight", "layers.1.blocks.0.mlp.fc1.weight"):
        name = "simmim.encoder." + name
        assert params[name].std().item() == pytest.approx(0.02, rel=0.1), name
    bound = 1 / math.sqrt(3 * 2 * 2)
    conv = params["simmim.encoder.patch_embed.proj.weight"]
    assert conv.abs().max() <= bound and conv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)


def test_every_block_starts_as_the_identity():
    """With both post-norms at zero, x + norm1(attn(x)) = x and x + norm2(mlp(x)) = x."""
    torch.manual_seed(0)
    model = SimMIMModel(SimMIMConfig(**tiny_swinv2())).eval()
    seen = []

    def record(block, args, output):
        seen.append(torch.equal(output[0], args[0]))

    for stage in model.encoder.layers:
        for block in stage.blocks:
            block.register_forward_hook(record)
    model(torch.randn(2, 3, 32, 32))
    assert seen == [True] * 4


# ---------------------------------------------------------------------------------------------- kernels
def test_sdpa_matches_the_eager_kernel_and_returns_no_weights():
    model = perturbed(SimMIMForMaskedImageModeling)
    pixel_values, mask = inputs(model.config)
    with torch.no_grad():
        sdpa = model(pixel_values, bool_masked_pos=mask)
        model.set_attn_implementation("eager")
        eager = model(pixel_values, bool_masked_pos=mask)
    diff = max_abs_diff(sdpa.reconstruction, eager.reconstruction)
    print(f"[numerics] swinv2 SDPA vs eager: reconstruction max abs diff {diff:.3g}")
    assert diff <= ATOL and abs(sdpa.loss.item() - eager.loss.item()) <= ATOL
    assert sdpa.attentions is None


def test_attention_weights_per_window_and_shift_mask():
    model = perturbed(SimMIMModel)
    pixel_values, _ = inputs(model.config)
    with torch.no_grad():
        attentions = model(pixel_values, output_attentions=True).attentions
    # stage 0: 16x16 tokens, 16 windows of 4x4; stage 1: 8x8 tokens, 4 windows; heads 1 and 2
    assert [tuple(a.shape) for a in attentions] == [(32, 1, 16, 16)] * 2 + [(8, 2, 16, 16)] * 2
    for weights in attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    block = model.encoder.layers[0].blocks[1]
    across = (block.attn_mask < 0).expand(2, -1, -1, -1).reshape(32, 1, 16, 16)
    assert across.any() and attentions[1][across].max() < 1e-6  # shifted windows do not attend across regions


def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing):
        model = perturbed(SimMIMForMaskedImageModeling).train()
        if checkpointing:
            with warnings.catch_warnings():
                # transformers 5 renames it activation_checkpointing_enable
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert model.simmim.encoder.layers[0].blocks[0].gradient_checkpointing
        pixel_values, mask = inputs(model.config)
        model(pixel_values, bool_masked_pos=mask).loss.backward()
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- geometry
def test_a_stage_no_larger_than_the_window_is_one_unshifted_window():
    model = SimMIMModel(SimMIMConfig(**tiny_swinv2(window_size=8)))
    first, second = model.encoder.layers
    assert [(b.window, b.shift, b.attn_mask is None) for b in first.blocks] == [(8, 0, True), (8, 4, False)]
    assert [(b.window, b.shift, b.attn_mask is None) for b in second.blocks] == [(8, 0, True), (8, 0, True)]
    assert second.blocks[1].attn.relative_coords_table.shape == (1, 15, 15, 2)


def test_relative_coordinates_by_hand():
    """Window 3: offsets -2..2 over (3 - 1), times 8: -8, -4, 0, 4, 8 -> sign * log2(|t| + 1) / 3. Pretrained with
    window 2: over (2 - 1): -16, -8, 0, 8, 16."""
    for pretrained, scaled in ((0, [-8, -4, 0, 4, 8]), (2, [-16, -8, 0, 8, 16])):
        expected = [math.copysign(math.log2(abs(t) + 1) / 3, t) for t in scaled]
        table = swinv2_relative_coords_table(3, pretrained)
        assert table.shape == (1, 5, 5, 2)
        torch.testing.assert_close(table[0, :, 0, 0], torch.tensor(expected))  # vertical offsets
        torch.testing.assert_close(table[0, 2, :, 1], torch.tensor(expected))  # horizontal offsets
    assert torch.equal(swinv2_relative_coords_table(1), torch.zeros(1, 1, 1, 2))


def test_the_logit_scale_is_clamped_at_100():
    model = perturbed(SimMIMModel)
    pixel_values, _ = inputs(model.config)

    def output(log_scale):
        with torch.no_grad():
            for stage in model.encoder.layers:
                for block in stage.blocks:
                    block.attn.logit_scale.fill_(log_scale)
            return model(pixel_values).last_hidden_state

    at_clamp = output(math.log(100.0))
    assert torch.equal(output(math.log(1000.0)), at_clamp)
    assert max_abs_diff(output(math.log(50.0)), at_clamp) > 1e-3


# ---------------------------------------------------------------------------------------------- normalised target
def local_target_by_hand(images, p):
    """Each pixel standardised over the in-image part of its p x p neighbourhood, unbiased variance, in float64."""
    x = images.double().numpy()
    out = np.empty_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            window = x[..., max(0, i - p // 2) : i + p // 2 + 1, max(0, j - p // 2) : j + p // 2 + 1]
            variance = window.reshape(*x.shape[:2], -1).var(axis=-1, ddof=1)
            out[..., i, j] = (x[..., i, j] - window.mean(axis=(-2, -1))) / np.sqrt(variance + 1e-6)
    return torch.from_numpy(out)


def test_local_normalised_target_and_its_loss_by_hand():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=generator) * 3 + 1
    reconstruction = torch.randn(2, 3, 8, 8, generator=generator)
    target = local_target_by_hand(images, 5)
    assert max_abs_diff(normalize_locally(images, 5), target) <= ATOL
    grid = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]], dtype=torch.bool)
    pixels = grid.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).double()
    loss = simmim_loss(images, reconstruction, grid, 4, norm_target="local", norm_target_patch_size=5)
    official = ((target - reconstruction.double()).abs() * pixels).sum() / (pixels.sum() + 1e-5) / 3
    assert loss.item() == pytest.approx(official.item(), rel=1e-5)
    assert loss.item() != pytest.approx(simmim_loss(images, reconstruction, grid, 4).item(), rel=1e-2)


def test_norm_target_choices_and_older_configs():
    assert SimMIMConfig(norm_target=True).norm_target == "patch"  # what a boolean meant before "local"
    assert SimMIMConfig(norm_target=False).norm_target is None
    assert SimMIMConfig.from_dict({**SimMIMConfig().to_dict(), "norm_target": True}).norm_target == "patch"
    assert SimMIMConfig.from_dict(SimMIMConfig().to_dict(), norm_target=True).norm_target == "patch"
    with pytest.raises(ValueError, match="norm_target='global'"):
        SimMIMConfig(norm_target="global")
    with pytest.raises(ValueError, match="norm_target_patch_size=48 must be odd"):
        SimMIMConfig(norm_target="local", norm_target_patch_size=48)


# ---------------------------------------------------------------------------------------------- config
def test_config_fields_of_the_backbone():
    config = SimMIMConfig(**tiny_swinv2())
    assert config.pretrained_window_sizes == [0, 0] and config.hidden_size == 16 and config.encoder_stride == 4
    assert config.to_dict()["pretrained_window_sizes"] == [0, 0]
    assert "pretrained_window_sizes" not in SimMIMConfig(backbone="swin").to_dict()
    assert {"embed_dim", "window_size"} <= set(config.to_dict()) and "num_attention_heads" not in config.to_dict()
    with pytest.raises(ValueError, match="pretrained_window_sizes=\\[4\\] must hold one window size"):
        SimMIMConfig(**tiny_swinv2(pretrained_window_sizes=[4]))
    assert SimMIMConfig(backbone="swinv2").image_size == 192


# ---------------------------------------------------------------------------------------------- fine-tuning
def cpb_table(block):
    """The position-bias MLP's output at each relative offset of the block's window, `(2w-1, 2w-1, heads)`."""
    attn = block.attn
    with torch.no_grad():
        return attn.cpb_mlp(attn.relative_coords_table)[0]


def test_fine_tuning_at_a_larger_window_keeps_the_learned_bias(tmp_path):
    """A checkpoint pretrained with window 4 loaded with window_size=8: the coordinates are scaled by the pretrained
    window (pretrained_window_sizes [4, 4], set on loading), so each offset the MLP learned keeps its bias and the
    new offsets extend it; every encoder weight loads, none is interpolated."""
    pretrained = perturbed(SimMIMForMaskedImageModeling)
    pretrained.save_pretrained(tmp_path / "pretrained")
    model, info = SimMIMForImageClassification.from_pretrained(
        tmp_path / "pretrained", window_size=8, num_labels=3, output_loading_info=True
    )
    assert model.config.pretrained_window_sizes == [4, 4] and model.config.window_size == 8
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["mismatched_keys"]
    old_block, new_block = pretrained.simmim.encoder.layers[0].blocks[0], model.simmim.encoder.layers[0].blocks[0]
    assert new_block.window == 8 and new_block.attn.relative_position_index.shape == (64, 64)
    # the pretrained offsets -3..3 sit at the same coordinates, so the MLP gives them the same bias
    old_coords, new_coords = old_block.attn.relative_coords_table[0], new_block.attn.relative_coords_table[0]
    assert torch.equal(new_coords[4:11, 4:11], old_coords)
    old, new = cpb_table(old_block), cpb_table(new_block)  # (7, 7, heads), (15, 15, heads)
    torch.testing.assert_close(new[4:11, 4:11], old, rtol=0, atol=1e-6)
    assert new.abs().max() > old.abs().max()  # farther offsets reach coordinates beyond the pretrained range
    # without the pretrained windows, the same offsets would sit at other coordinates
    assert max_abs_diff(swinv2_relative_coords_table(8)[0, 4:11, 4:11], old_coords) > 0.1


def test_pretrained_windows_are_kept_or_left_alone(tmp_path):
    pretrained = perturbed(SimMIMForMaskedImageModeling)
    pretrained.save_pretrained(tmp_path / "pretrained")
    # the same windows at a larger image (grids 32 and 16, windows still 4): nothing to record
    assert SimMIMConfig.from_pretrained(tmp_path / "pretrained", image_size=64).pretrained_window_sizes == [0, 0]
    # a fine-tuned checkpoint keeps the windows its bias was pretrained with, whatever window it is loaded with next
    SimMIMConfig(**tiny_swinv2(window_size=8, pretrained_window_sizes=[4, 4])).save_pretrained(tmp_path / "tuned")
    assert SimMIMConfig.from_pretrained(tmp_path / "tuned", window_size=4).pretrained_window_sizes == [4, 4]
    with pytest.raises(ValueError, match="window_size=5 does not divide"):
        SimMIMConfig.from_pretrained(tmp_path / "pretrained", window_size=5)


def test_classifier_averages_the_final_tokens():
    model = perturbed(SimMIMForImageClassification, num_labels=3)
    pixel_values, _ = inputs(model.config)
    with torch.no_grad():
        tokens = model.simmim(pixel_values).last_hidden_state
        logits = model(pixel_values).logits
    torch.testing.assert_close(logits, model.classifier(tokens.mean(dim=1)))
