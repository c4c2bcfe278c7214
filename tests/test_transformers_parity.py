"""Parity with transformers' own `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling`: their checkpoints
convert to ours with the same loss and reconstruction, and ours export back to theirs."""

import json

import pytest
import torch
from conftest import max_abs_diff, perturb_parameters_, tiny_swin, tiny_vit
from transformers import SwinConfig, SwinForMaskedImageModeling, ViTConfig, ViTForMaskedImageModeling

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from hf_simmim.cli import main as cli_main
from hf_simmim.convert import convert_transformers_checkpoint, export_to_transformers

ATOL = 1e-5


def tiny_hf_vit():
    # transformers' ViT decoder only reconstructs full-size images when patch_size == encoder_stride.
    return ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        encoder_stride=4,
    )


def tiny_hf_swin(**kwargs):
    return SwinConfig(
        embed_dim=8,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=4,
        image_size=32,
        patch_size=2,
        encoder_stride=4,
        **kwargs,
    )


HF_MODELS = {
    "vit": lambda: ViTForMaskedImageModeling(tiny_hf_vit()),
    "swin": lambda: SwinForMaskedImageModeling(tiny_hf_swin()),
    "swin-abs-pos": lambda: SwinForMaskedImageModeling(tiny_hf_swin(use_absolute_embeddings=True)),
}


def inputs_for(image_size, patch_size, seed=0):
    """Two images and two masks of the SimMIM kind, as `(B, num_patches)` bool (what transformers accepts)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, image_size, image_size, generator=generator)
    masks = SimMIMMaskGenerator(image_size, 8, patch_size, 0.6, seed=seed)
    bool_masked_pos = torch.stack([torch.from_numpy(masks()).flatten() for _ in range(2)])
    assert bool_masked_pos.any(dim=1).all() and not bool_masked_pos.all()
    return pixel_values, bool_masked_pos


def compare(reference, ours, pixel_values, bool_masked_pos, label):
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=bool_masked_pos)
        actual = ours(pixel_values, bool_masked_pos=bool_masked_pos)
    assert actual.reconstruction.shape == expected.reconstruction.shape == pixel_values.shape
    loss_diff = abs(actual.loss.item() - expected.loss.item())
    rec_diff = max_abs_diff(actual.reconstruction, expected.reconstruction)
    print(f"[parity] transformers {label}: max abs diff loss {loss_diff:.3g}, reconstruction {rec_diff:.3g}")
    assert loss_diff <= ATOL
    assert rec_diff <= ATOL


def saved_hf_model(name, tmp_path):
    torch.manual_seed(0)
    hf_model = perturb_parameters_(HF_MODELS[name]()).eval()
    # Premise: the decoder of this transformers configuration reconstructs full-size images.
    with torch.no_grad():
        size = hf_model.config.image_size
        assert hf_model(torch.zeros(1, 3, size, size)).reconstruction.shape == (1, 3, size, size)
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder)
    return hf_model, folder


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_transformers_checkpoint_converts_with_same_outputs(name, tmp_path):
    hf_model, folder = saved_hf_model(name, tmp_path)
    ours = convert_transformers_checkpoint(str(folder))
    assert isinstance(ours, SimMIMForMaskedImageModeling)
    hf = hf_model.config
    config = ours.config
    assert config.image_size == hf.image_size and config.patch_size == hf.patch_size
    assert config.encoder_stride == hf.encoder_stride
    assert config.layer_norm_eps == hf.layer_norm_eps
    if name == "vit":
        assert config.layer_norm_eps == 1e-12  # transformers' ViT default, carried over
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
        assert config.mlp_ratio * config.hidden_size == hf.intermediate_size
        assert config.use_absolute_position_embeddings and not config.use_shared_relative_position_bias
    else:
        assert (config.embed_dim, config.depths, config.num_heads, config.window_size) == (8, [2, 2], [1, 2], 4)
        assert config.use_absolute_position_embeddings == hf.use_absolute_embeddings
    pixel_values, mask = inputs_for(hf.image_size, hf.patch_size)
    compare(hf_model, ours, pixel_values, mask, f"{name} -> ours (python api)")
    # The encoder output itself matches too.
    with torch.no_grad():
        base = getattr(hf_model, hf_model.base_model_prefix)
        expected = base(pixel_values, bool_masked_pos=mask).last_hidden_state
        actual = ours.simmim(pixel_values, bool_masked_pos=mask).last_hidden_state
    assert max_abs_diff(actual, expected) <= ATOL


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_transformers_checkpoint_converts_with_cli(name, tmp_path):
    hf_model, folder = saved_hf_model(name, tmp_path)
    out_dir = tmp_path / "ours"
    assert cli_main(["convert", "transformers", str(folder), str(out_dir)]) == 0
    ours = SimMIMForMaskedImageModeling.from_pretrained(out_dir)
    assert (out_dir / "preprocessor_config.json").is_file()
    with open(out_dir / "preprocessor_config.json") as f:
        assert json.load(f)["image_size"] == hf_model.config.image_size
    pixel_values, mask = inputs_for(hf_model.config.image_size, hf_model.config.patch_size, seed=1)
    compare(hf_model, ours, pixel_values, mask, f"{name} -> ours (cli)")


def test_sharded_transformers_checkpoint_converts(tmp_path):
    torch.manual_seed(0)
    hf_model = perturb_parameters_(HF_MODELS["swin"]()).eval()
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder, max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    pixel_values, mask = inputs_for(32, 2, seed=4)
    compare(hf_model, convert_transformers_checkpoint(str(folder)), pixel_values, mask, "swin (sharded) -> ours")


def test_transformers_checkpoint_without_decoder_keeps_our_decoder(tmp_path):
    """A transformers ViTModel-style folder (encoder only) still converts; the decoder is freshly initialised."""
    from safetensors.torch import load_file, save_file

    _, folder = saved_hf_model("vit", tmp_path)
    state_dict = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("decoder.")}
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    ours = convert_transformers_checkpoint(str(folder))
    assert torch.equal(
        ours.state_dict()["simmim.encoder.patch_embed.proj.weight"],
        state_dict["vit.embeddings.patch_embeddings.projection.weight"],
    )


def test_transformers_checkpoint_with_wrong_encoder_stride_is_refused(tmp_path):
    hf_config = tiny_hf_vit()
    hf_config.encoder_stride = 8  # transformers accepts this, and reconstructs 64x64 images from 32x32 inputs
    folder = tmp_path / "hf"
    ViTForMaskedImageModeling(hf_config).save_pretrained(folder)
    with pytest.raises(ValueError, match="encoder_stride"):
        convert_transformers_checkpoint(str(folder))


# ---------------------------------------------------------------------------------------------- export
PLAIN_VIT = tiny_vit(
    use_absolute_position_embeddings=True,
    use_relative_position_bias=False,
    use_shared_relative_position_bias=False,
    layer_scale_init_value=0.0,
)
SWIN = tiny_swin()
EXPORTABLE = {
    "vit": PLAIN_VIT,
    "swin": SWIN,
    "swin-abs-pos": dict(SWIN, use_absolute_position_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_to_transformers_reproduces_ours(name, tmp_path):
    torch.manual_seed(0)
    ours = perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig(**EXPORTABLE[name]))).eval()
    exported = export_to_transformers(ours, str(tmp_path / "hf"))
    expected_class = ViTForMaskedImageModeling if name == "vit" else SwinForMaskedImageModeling
    assert type(exported) is expected_class
    # Reload with transformers' own class, independently of what export_to_transformers returned.
    reloaded = expected_class.from_pretrained(tmp_path / "hf")
    pixel_values, mask = inputs_for(32, ours.config.patch_size, seed=2)
    compare(reloaded, ours, pixel_values, mask, f"ours -> {name} (export)")


def test_export_to_transformers_with_cli(tmp_path):
    torch.manual_seed(0)
    ours = perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig(**PLAIN_VIT))).eval()
    ours.save_pretrained(tmp_path / "ours")
    assert cli_main(["convert", "to-transformers", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    reloaded = ViTForMaskedImageModeling.from_pretrained(tmp_path / "hf")
    assert reloaded.config.layer_norm_eps == ours.config.layer_norm_eps
    pixel_values, mask = inputs_for(32, 4, seed=3)
    compare(reloaded, ours, pixel_values, mask, "ours -> vit (cli export)")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({}, "use_shared_relative_position_bias"),  # the official SimMIM ViT variant, as built by default
        (dict(use_relative_position_bias=True, use_shared_relative_position_bias=False), "use_relative_position_bias"),
        (dict(layer_scale_init_value=0.1), "layer_scale_init_value"),
        (dict(use_absolute_position_embeddings=False), "use_absolute_position_embeddings"),
    ],
)
def test_export_of_official_vit_variant_is_refused(overrides, field, tmp_path):
    if overrides:
        config = SimMIMConfig(**{**PLAIN_VIT, **overrides})
    else:
        config = SimMIMConfig.from_preset("vit-tiny-test")
    model = SimMIMForMaskedImageModeling(config)
    with pytest.raises(ValueError, match=field):
        export_to_transformers(model, str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_without_learned_mask_token_is_refused(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**SWIN, mask_token_type="noise"))
    with pytest.raises(ValueError, match="mask_token_type"):
        export_to_transformers(model, str(tmp_path / "hf"))
