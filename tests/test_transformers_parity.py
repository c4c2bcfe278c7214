"""Parity with transformers' own classes: their `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` /
`Swinv2ForMaskedImageModeling` checkpoints convert to ours with the same loss and reconstruction, and ours export to
their ViT, BEiT, Swin and Swinv2 classes with the same outputs and an image processor of theirs that preprocesses as
ours."""

import json

import numpy as np
import pytest
import torch
from conftest import (
    max_abs_diff,
    perturb_parameters_,
    tiny_convnextv2,
    tiny_resnet,
    tiny_swin,
    tiny_swinv2,
    tiny_vit,
)
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    SwinConfig,
    SwinForImageClassification,
    SwinForMaskedImageModeling,
    SwinModel,
    Swinv2Config,
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
    Swinv2Model,
    ViTConfig,
    ViTForMaskedImageModeling,
)

from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMImageProcessor,
    SimMIMMaskGenerator,
    SimMIMModel,
)
from hf_simmim.cli import main as cli_main
from hf_simmim.convert import convert_transformers_checkpoint, export_to_transformers, transformers_config_from_simmim

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


def tiny_hf_swinv2(**kwargs):
    fields = dict(embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4, pretrained_window_sizes=[0, 0])
    return Swinv2Config(**{**fields, **kwargs}, image_size=32, patch_size=2, encoder_stride=4)


HF_MODELS = {
    "vit": lambda: ViTForMaskedImageModeling(tiny_hf_vit()),
    "swin": lambda: SwinForMaskedImageModeling(tiny_hf_swin()),
    "swin-abs-pos": lambda: SwinForMaskedImageModeling(tiny_hf_swin(use_absolute_embeddings=True)),
    "swinv2": lambda: Swinv2ForMaskedImageModeling(tiny_hf_swinv2()),
    # fine-tuned at window 8 from window 4: stage 1's 8x8 grid is one window, coordinates scaled by 4
    "swinv2-pretrained-windows": lambda: Swinv2ForMaskedImageModeling(
        tiny_hf_swinv2(window_size=8, pretrained_window_sizes=[4, 4])
    ),
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
        assert (config.embed_dim, config.depths, config.num_heads, config.window_size) == (
            8, [2, 2], [1, 2], hf.window_size
        )
        assert config.use_absolute_position_embeddings == hf.use_absolute_embeddings
        assert config.backbone == hf.model_type
    if hf.model_type == "swinv2":
        assert config.pretrained_window_sizes == list(hf.pretrained_window_sizes)
    pixel_values, mask = inputs_for(hf.image_size, hf.patch_size)
    compare(hf_model, ours, pixel_values, mask, f"{name} -> ours (python api)")
    # The encoder output itself matches too.
    with torch.no_grad():
        base = getattr(hf_model, hf_model.base_model_prefix)
        expected = base(pixel_values, bool_masked_pos=mask).last_hidden_state
        actual = ours.simmim(pixel_values, bool_masked_pos=mask).last_hidden_state
    assert max_abs_diff(actual, expected) <= ATOL


@pytest.mark.parametrize("name", ["vit", "swin", "swinv2"])
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


def test_transformers_swinv2_with_absolute_positions_is_refused(tmp_path):
    """transformers' Swinv2 holds num_patches + 1 absolute positions and cannot add them (its forward fails), so such a
    checkpoint has no function to reproduce."""
    hf_model = Swinv2ForMaskedImageModeling(tiny_hf_swinv2(use_absolute_embeddings=True))
    with pytest.raises(RuntimeError):  # the premise
        hf_model(torch.zeros(1, 3, 32, 32))
    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="use_absolute_embeddings"):
        convert_transformers_checkpoint(str(tmp_path / "hf"))


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
SWINV2 = tiny_swinv2()
EXPORTABLE = {
    "vit": PLAIN_VIT,
    "swin": SWIN,
    "swin-abs-pos": dict(SWIN, use_absolute_position_embeddings=True),
    "swinv2": SWINV2,
    "swinv2-pretrained-windows": dict(SWINV2, window_size=8, pretrained_window_sizes=[4, 4]),
}
MIM_CLASSES = {
    "vit": ViTForMaskedImageModeling, "swin": SwinForMaskedImageModeling, "swinv2": Swinv2ForMaskedImageModeling
}


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_export_to_transformers_reproduces_ours(name, tmp_path):
    torch.manual_seed(0)
    ours = perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig(**EXPORTABLE[name]))).eval()
    exported = export_to_transformers(ours, str(tmp_path / "hf"))
    expected_class = MIM_CLASSES[ours.config.backbone]
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
        (dict(use_mean_pooling=True), "use_mean_pooling"),
    ],
)
def test_transformers_vit_config_refuses_what_only_beit_holds(overrides, field):
    config = SimMIMConfig(**{**PLAIN_VIT, **overrides}) if overrides else SimMIMConfig.from_preset("vit-tiny-test")
    with pytest.raises(ValueError, match=field):
        transformers_config_from_simmim(config, "vit")
    assert isinstance(transformers_config_from_simmim(config), BeitConfig)  # what the default picks instead


def test_swinv2_with_absolute_positions_does_not_export(tmp_path):
    model = SimMIMModel(SimMIMConfig(**SWINV2, use_absolute_position_embeddings=True))
    with pytest.raises(ValueError, match="use_absolute_position_embeddings"):
        export_to_transformers(model, str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_export_without_learned_mask_token_is_refused(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**SWIN, mask_token_type="noise"))
    with pytest.raises(ValueError, match="mask_token_type"):
        export_to_transformers(model, str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- export as BEiT
# Every ViT but the plain one: transformers' BEiT is the official SimMIM ViT's layout.
BEIT_VARIANTS = {
    "shared": tiny_vit(),  # the official variant: shared table, layer scale, no absolute position embedding
    "per-block": tiny_vit(use_relative_position_bias=True, use_shared_relative_position_bias=False),
    "both-tables+abs-pos+no-qkv-bias": tiny_vit(
        use_relative_position_bias=True, use_absolute_position_embeddings=True, qkv_bias=False
    ),
}


def perturbed(model_class, fields, **overrides):
    torch.manual_seed(0)
    return perturb_parameters_(model_class(SimMIMConfig(**fields, **overrides))).eval()


def assert_close(actual, expected, label):
    diff = max_abs_diff(actual, expected)
    print(f"[parity] {label}: max abs diff {diff:.3g}")
    assert actual.shape == expected.shape
    assert diff <= ATOL


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS))
def test_vit_pretraining_model_exports_its_encoder_as_beit(variant, tmp_path):
    ours = perturbed(SimMIMForMaskedImageModeling, BEIT_VARIANTS[variant])
    export_to_transformers(ours, str(tmp_path / "hf"))
    reloaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is BeitModel  # transformers' BEiT has no pixel decoder: the encoder goes alone
    pixel_values, mask = inputs_for(32, 4, seed=5)
    with torch.no_grad():
        for bool_masked_pos, masked in [(None, "unmasked"), (mask, "masked")]:
            assert_close(
                reloaded(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state,
                ours.simmim(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state,
                f"ours -> BeitModel ({variant}, {masked}) last_hidden_state",
            )


@pytest.mark.parametrize("variant, use_mean_pooling", [("shared", False), ("per-block", True), ("plain", True)])
def test_vit_encoder_exports_as_beit_model(variant, use_mean_pooling, tmp_path):
    fields = PLAIN_VIT if variant == "plain" else BEIT_VARIANTS[variant]
    ours = perturbed(SimMIMModel, fields, use_mean_pooling=use_mean_pooling)
    export_to_transformers(ours, str(tmp_path / "hf"))
    reloaded = BeitModel.from_pretrained(tmp_path / "hf").eval()
    pixel_values, _ = inputs_for(32, 4, seed=6)
    with torch.no_grad():
        expected, actual = ours(pixel_values), reloaded(pixel_values)
    label = f"ours -> BeitModel ({variant}, use_mean_pooling={use_mean_pooling})"
    assert_close(actual.last_hidden_state, expected.last_hidden_state, label + " last_hidden_state")
    if use_mean_pooling:
        assert_close(actual.pooler_output, expected.pooler_output, label + " pooler_output")
    else:  # BEiT pools the CLS token here; ours, the mean of the patch tokens (the module docstring says so)
        assert_close(actual.last_hidden_state[:, 1:].mean(1), expected.pooler_output, label + " mean of patches")


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS) + ["plain"])
def test_vit_classifier_exports_as_beit_for_image_classification(variant, tmp_path):
    fields = PLAIN_VIT if variant == "plain" else BEIT_VARIANTS[variant]
    labels = {0: "cat", 1: "dog", 2: "fox"}
    ours = perturbed(SimMIMForImageClassification, fields, id2label=labels, label2id={v: k for k, v in labels.items()})
    export_to_transformers(ours, str(tmp_path / "hf"))
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is BeitForImageClassification
    assert reloaded.config.id2label == labels
    pixel_values, _ = inputs_for(32, 4, seed=7)
    with torch.no_grad():
        label = f"ours -> BeitForImageClassification ({variant})"
        assert_close(
            reloaded.beit(pixel_values).pooler_output, ours.simmim(pixel_values).pooler_output, label + " pooled"
        )
        assert_close(reloaded(pixel_values).logits, ours(pixel_values).logits, label + " logits")


@pytest.mark.parametrize(
    "model_class, hf_class, fields",
    [
        (SimMIMModel, SwinModel, SWIN),
        (SimMIMForImageClassification, SwinForImageClassification, SWIN),
        (SimMIMModel, Swinv2Model, SWINV2),
        (SimMIMForImageClassification, Swinv2ForImageClassification, EXPORTABLE["swinv2-pretrained-windows"]),
    ],
)
def test_swin_encoder_and_classifier_export_to_swin(model_class, hf_class, fields, tmp_path):
    ours = perturbed(model_class, fields, num_labels=4)
    export_to_transformers(ours, str(tmp_path / "hf"))
    reloaded = hf_class.from_pretrained(tmp_path / "hf").eval()
    pixel_values, _ = inputs_for(32, 2, seed=8)
    with torch.no_grad():
        expected, actual = ours(pixel_values), reloaded(pixel_values)
    if model_class is SimMIMModel:
        assert_close(actual.last_hidden_state, expected.last_hidden_state, f"ours -> {hf_class.__name__} tokens")
        assert_close(actual.pooler_output, expected.pooler_output, f"ours -> {hf_class.__name__} pooler_output")
    else:
        assert_close(actual.logits, expected.logits, f"ours -> {hf_class.__name__} logits")


def test_cli_exports_a_classifier_checkpoint_with_its_processor(tmp_path):
    ours = perturbed(SimMIMForImageClassification, tiny_vit(), num_labels=3)
    ours.save_pretrained(tmp_path / "ours")
    SimMIMImageProcessor.from_model_config(ours.config, crop_pct=0.875).save_pretrained(tmp_path / "ours")
    assert cli_main(["convert", "to-transformers", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is BeitForImageClassification
    pixel_values, _ = inputs_for(32, 4, seed=9)
    with torch.no_grad():
        assert_close(reloaded(pixel_values).logits, ours(pixel_values).logits, "ours -> Beit classifier (cli)")
    with open(tmp_path / "hf" / "preprocessor_config.json") as f:
        assert json.load(f)["size"] == {"shortest_edge": 36}  # the checkpoint's crop_pct 0.875, not the default


# ---------------------------------------------------------------------------------------------- image processor
def random_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "model_class, fields, processor_name",
    [
        (SimMIMForMaskedImageModeling, PLAIN_VIT, "ViTImageProcessor"),
        (SimMIMForMaskedImageModeling, SWIN, "ViTImageProcessor"),
        (SimMIMForImageClassification, tiny_vit(), "BeitImageProcessor"),
        (SimMIMForImageClassification, tiny_resnet(), "ConvNextImageProcessor"),  # as microsoft/resnet-50
        (SimMIMForMaskedImageModeling, tiny_convnextv2(), "ConvNextImageProcessor"),
    ],
)
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_every_export_writes_a_transformers_image_processor(model_class, fields, processor_name, crop_pct, tmp_path):
    model = model_class(SimMIMConfig(**fields))
    ours = SimMIMImageProcessor.from_model_config(model.config, crop_pct=crop_pct)
    export_to_transformers(model, str(tmp_path / "hf"), ours)
    theirs = AutoImageProcessor.from_pretrained(tmp_path / "hf")  # PIL backend here: torchvision is not installed
    assert type(theirs).__name__.startswith(processor_name)
    # The same-size image, and others whose crop margins are even (see transformers_image_processor's docstring).
    for seed, (width, height) in enumerate([(32, 32), (48, 64), (64, 48), (40, 50)]):
        image = random_image(width, height, seed)
        expected = ours(image, return_tensors="pt")["pixel_values"]
        actual = theirs(image, return_tensors="pt")["pixel_values"]
        assert_close(actual, expected, f"{processor_name} {width}x{height} crop_pct={crop_pct}")
