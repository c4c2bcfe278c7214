"""ResNet and ConvNeXt (V1, V2) as SimMIM models: the config (transformers' defaults, validation that names the fix,
saved fields), the three model classes (masking that never lets the pixels under the mask reach the encoder or the
reconstruction, save / load through the Auto classes, the official initialisation, gradient checkpointing per
stage), SparK's and FCMAE's normalised target, and the layer-wise decay groups of fine-tuning."""

import math
import warnings

import pytest
import torch
from conftest import max_abs_diff, perturb_parameters_, tiny_convnext, tiny_convnextv2, tiny_resnet
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
    ConvNextConfig,
    ConvNextV2Config,
    ResNetConfig,
)

from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    SimMIMModel,
    simmim_loss,
)
from hf_simmim.models.modeling_conv_masking import MaskedBatchNorm2d, visible_at
from hf_simmim.models.modeling_simmim import normalize_per_square
from hf_simmim.training.optim import layer_decay_parameter_groups, no_weight_decay_parameter_names

TINY = {"resnet": tiny_resnet(), "convnext": tiny_convnext(), "convnextv2": tiny_convnextv2()}
# (conv_masking, decoder_type): SparK / FCMAE, SimMIM's token masking with either decoder
MODES = [("sparse", "hierarchical"), ("token", "simmim"), ("token", "hierarchical")]


def config_of(name, **overrides):
    return SimMIMConfig(**{**TINY[name], **overrides})


def perturbed(model_class, name, seed=0, **overrides):
    torch.manual_seed(seed)
    return perturb_parameters_(model_class(config_of(name, **overrides)), std=0.1, seed=seed)


def inputs(config, batch=4, seed=0):
    size = config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    masks = SimMIMMaskGenerator.from_config(config, seed=seed)
    return pixel_values, torch.stack([torch.from_numpy(masks()) for _ in range(batch)]).bool()


# ---------------------------------------------------------------------------------------------- config
def test_unset_fields_take_transformers_resnet50_and_convnext_tiny():
    """The defaults are transformers' own ResNetConfig / ConvNextConfig / ConvNextV2Config defaults
    (microsoft/resnet-50, facebook/convnext-tiny-224) at 224 px; ConvNeXt's head norm eps is the official 1e-6
    (transformers: 1e-12)."""
    fields = ("num_channels", "hidden_sizes", "depths", "hidden_act")
    cases = [
        (SimMIMConfig(backbone="resnet"), ResNetConfig(), ("embedding_size", "layer_type")),
        (SimMIMConfig(backbone="convnext"), ConvNextConfig(), ("patch_size", "image_size", "layer_scale_init_value")),
        (SimMIMConfig(backbone="convnext", convnext_version=2), ConvNextV2Config(), ("patch_size", "image_size")),
    ]
    for ours, theirs, own in cases:
        theirs = theirs.to_dict()
        assert {f: getattr(ours, f) for f in fields + own} == {f: theirs[f] for f in fields + own}
        assert (ours.image_size, ours.patch_size, ours.encoder_stride) == (224, 4, 32)
        assert ours.hidden_size == theirs["hidden_sizes"][-1]
    assert SimMIMConfig(backbone="convnext").layer_norm_eps == 1e-6
    assert SimMIMConfig(backbone="convnext", convnext_version=2).layer_scale_init_value == 0.0
    assert (SimMIMConfig(backbone="resnet").conv_masking, SimMIMConfig(backbone="resnet").decoder_type) == (
        "token", "simmim"
    )


def test_saved_configs_hold_their_backbones_fields_only(tmp_path):
    config = config_of("resnet")
    saved = config.to_dict()
    assert {"embedding_size", "layer_type", "hidden_sizes", "conv_masking", "decoder_hidden_size"} <= saved.keys()
    assert not {"num_heads", "window_size", "convnext_version", "num_hidden_layers"} & saved.keys()
    convnext = config_of("convnextv2").to_dict()
    assert convnext["convnext_version"] == 2 and "embedding_size" not in convnext
    assert "conv_masking" not in SimMIMConfig().to_dict()
    config.save_pretrained(tmp_path)
    loaded = SimMIMConfig.from_pretrained(tmp_path).to_dict()
    assert {key: value for key, value in loaded.items() if key != "auto_map"} == saved


CONFIG_ERRORS = {
    "sparse needs the hierarchical decoder": (
        tiny_resnet(decoder_type="simmim"),
        r"conv_masking='sparse' with decoder_type='simmim'.*Set decoder_type='hierarchical'",
    ),
    "masking modes are for CNNs": (dict(backbone="vit", conv_masking="sparse"), r"are for the convolutional backbones"),
    "unknown masking mode": (tiny_convnext(conv_masking="dense"), r"conv_masking='dense'"),
    "unknown decoder": (tiny_convnext(decoder_type="unet"), r"decoder_type='unet'"),
    "resnet stem stride": (tiny_resnet(patch_size=2), r"patch_size=2 with backbone='resnet'.*set patch_size=4"),
    "decoder width": (
        tiny_resnet(decoder_hidden_size=40), r"decoder_hidden_size=40 must be divisible by encoder_stride=16"
    ),
    "stride not a power of 2": (
        tiny_convnext(image_size=48, patch_size=3, mask_patch_size=12), r"choose a patch_size that is a power of 2"
    ),
    "one width per stage": (tiny_convnext(hidden_sizes=[8, 16]), r"must have one entry per stage"),
    "v2 has no layer scale": (tiny_convnextv2(layer_scale_init_value=1e-6), r"ConvNeXt V2 has no layer scale"),
    "resnet layer type": (tiny_resnet(layer_type="wide"), r"layer_type='wide'"),
    "group layer ids need 4 stages": (tiny_convnext(layer_decay_type="group"), r"needs 4 stages"),
    "positive depths": (tiny_resnet(depths=[1, 0, 1]), r"depths\[1\]=0 must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_name_the_field_and_the_fix(case):
    fields, message = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        SimMIMConfig(**fields)


def test_overrides_at_loading_are_validated_and_rederive_the_stride(tmp_path):
    config_of("convnext").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="conv_masking='sparse' with decoder_type='simmim'"):
        SimMIMConfig.from_pretrained(tmp_path, decoder_type="simmim")
    four_stages = SimMIMConfig.from_pretrained(tmp_path, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
    assert (four_stages.encoder_stride, four_stages.hidden_size) == (32, 32)


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("conv_masking, decoder_type", MODES)
def test_pixels_under_the_mask_reach_neither_the_encoder_nor_the_reconstruction(name, conv_masking, decoder_type):
    """In training mode (batch statistics), every stage's output and the reconstruction are the same whatever the
    masked pixels hold; only the loss's target sees them."""
    model = perturbed(SimMIMForMaskedImageModeling, name, conv_masking=conv_masking, decoder_type=decoder_type).train()
    x, mask = inputs(model.config)
    under_mask = 1.0 - visible_at(mask, x.shape[-2:])
    changed = x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * under_mask
    with torch.no_grad():
        before = model(x, bool_masked_pos=mask, output_hidden_states=True)
        after = model(changed, bool_masked_pos=mask, output_hidden_states=True)
        unmasked = model(changed, output_hidden_states=True)
    assert len(before.hidden_states) == len(model.config.depths) + 1
    for stage, (a, b) in enumerate(zip(before.hidden_states, after.hidden_states)):
        assert torch.equal(a, b), stage
    assert torch.equal(before.reconstruction, after.reconstruction)
    assert before.loss != after.loss  # the target is the real image
    assert max_abs_diff(unmasked.hidden_states[-1], after.hidden_states[-1]) > 1e-3


def test_the_hierarchical_decoder_returns_no_hidden_states_unless_asked():
    model = SimMIMForMaskedImageModeling(config_of("resnet")).eval()
    x, mask = inputs(model.config, batch=2)
    with torch.no_grad():
        assert model(x, bool_masked_pos=mask).hidden_states is None
        assert len(model(x, bool_masked_pos=mask, output_hidden_states=True).hidden_states) == 4


def test_output_attentions_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="convolutional and has no attention weights"):
        SimMIMModel(config_of("convnext"))(torch.randn(1, 3, 32, 32), output_attentions=True)


# ---------------------------------------------------------------------------------------------- save / load
AUTO_CLASSES = {
    SimMIMModel: AutoModel,
    SimMIMForMaskedImageModeling: AutoModelForMaskedImageModeling,
    SimMIMForImageClassification: AutoModelForImageClassification,
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("model_class", list(AUTO_CLASSES), ids=lambda cls: cls.__name__)
def test_save_and_load_through_the_auto_classes(name, model_class, tmp_path):
    model = perturbed(model_class, name, num_labels=3)
    x, mask = inputs(model.config, batch=2)
    model.train()(x)  # batch norm running statistics move: they must travel too
    model.eval().save_pretrained(tmp_path)
    loaded, info = AUTO_CLASSES[model_class].from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is model_class and not any(info.values())
    kwargs = {"bool_masked_pos": mask} if model_class is SimMIMForMaskedImageModeling else {}
    with torch.no_grad():
        expected, actual = model(x, **kwargs), loaded.eval()(x, **kwargs)
    for key in expected.keys():
        assert torch.equal(expected[key], actual[key]), key
    assert set(loaded._no_split_modules) == {"ResNetStage" if name == "resnet" else "ConvNextStage"}


@pytest.mark.parametrize("name", sorted(TINY))
def test_fine_tuning_from_a_pretraining_checkpoint_starts_only_the_head_fresh(name, tmp_path):
    """The encoder (batch statistics included) comes over; the decoder and its mask tokens are left behind; new:
    the classifier and, for ConvNeXt, the head's LayerNorm (FCMAE pretrains without it)."""
    pretrained = perturbed(SimMIMForMaskedImageModeling, name)
    pretrained.train()(*inputs(pretrained.config, batch=2))
    pretrained.save_pretrained(tmp_path)
    model, info = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    new = {"classifier.weight", "classifier.bias"}
    if name != "resnet":
        new |= {"simmim.pooler.fc_norm.weight", "simmim.pooler.fc_norm.bias"}
    assert set(info["missing_keys"]) == new and not info["unexpected_keys"]
    ours = dict(model.simmim.encoder.state_dict())
    for key, value in pretrained.simmim.encoder.state_dict().items():
        if key != "mask_token":
            assert torch.equal(ours[key], value), key


# ---------------------------------------------------------------------------------------------- initialisation
def test_official_initialisation_of_resnet():
    """transformers' ResNet: convolutions Kaiming normal (fan out, ReLU), batch norms 1 / 0 with standard running
    statistics; its head PyTorch's default U(+-1/sqrt(fan_in)); the hierarchical decoder as SparK's (truncated normal
    std .02, transposed convolutions Kaiming normal, mask tokens within +-.02)."""
    torch.manual_seed(0)
    config = config_of("resnet", embedding_size=64, hidden_sizes=[64, 128, 256], num_labels=10)
    model = SimMIMForMaskedImageModeling(config)
    conv = model.simmim.encoder.stages[2].layers[0].layer[0].convolution.weight  # 3x3, 256 out: fan_out 2304
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not module.bias.any()
            assert not module.running_mean.any() and torch.equal(module.running_var, torch.ones(module.num_features))
    decoder = model.decoder
    assert decoder.blocks[0].conv1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(d.mask_token.abs().max() <= 0.02 for d in decoder.densify)
    upsample = decoder.blocks[0].upsample.weight  # ConvTranspose2d(32, 32, 4): torch's fan_out = weight.shape[0] x 16
    assert upsample.std().item() == pytest.approx(math.sqrt(2 / (upsample.shape[0] * 16)), rel=0.1)
    head = SimMIMForImageClassification(config).classifier
    bound = 1 / math.sqrt(256)
    assert head.weight.abs().max() <= bound and head.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("version, head_scale", [(1, 1.0), (2, 1e-3)])
def test_official_initialisation_of_convnext(version, head_scale):
    """The official ConvNeXt: convolutions and Linear layers truncated normal std .02, biases 0, layer scale at its
    init (V1), GRN 0 (V2); the fine-tuning head scaled by ConvNeXt V2's head_init_scale 1e-3 (main_finetune.py)."""
    torch.manual_seed(0)
    fields = tiny_convnext if version == 1 else tiny_convnextv2
    config = SimMIMConfig(**fields(hidden_sizes=[64, 128, 256], num_labels=200))
    model = SimMIMForImageClassification(config)
    layer = model.simmim.encoder.stages[2].layers[0]
    assert layer.pwconv1.weight.std().item() == pytest.approx(0.02, rel=0.05) and not layer.pwconv1.bias.any()
    if version == 1:
        assert torch.equal(layer.layer_scale_parameter, torch.full((256,), 0.5))
    else:
        assert layer.layer_scale_parameter is None and not layer.grn.weight.any() and not layer.grn.bias.any()
    assert model.classifier.weight.std().item() == pytest.approx(0.02 * head_scale, rel=0.05)
    assert not model.classifier.bias.any()


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["resnet", "convnextv2"])
def test_gradient_checkpointing_per_stage_gives_the_same_gradients(name):
    def gradients(checkpointing):
        model = perturbed(SimMIMForMaskedImageModeling, name).train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert all(stage.gradient_checkpointing for stage in model.simmim.encoder.stages)
        x, mask = inputs(model.config, batch=2)
        model(x, bool_masked_pos=mask).loss.backward()
        return {key: param.grad for key, param in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for key, grad in plain.items():
        assert max_abs_diff(grad, checkpointed[key]) < 1e-6, key


def test_mask_patch_target_is_spark_and_fcmae_normalised_pixels():
    """SparK's spark.py l. 113-120 / FCMAE's fcmae.py l. 164-184, written out: patchify into (B, L, p*p*C), standardise
    each row with its unbiased variance, mean squared error per masked patch, averaged over masked patches."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=generator)
    reconstruction = torch.randn(2, 3, 16, 16, generator=generator)
    masked_squares = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], dtype=torch.bool)  # 8 px squares

    def patchify(x, p=8):
        b, c, h, w = x.shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)

    target, predicted = patchify(images), patchify(reconstruction)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((predicted - target) ** 2).mean(-1)
    expected = (per_patch * masked_squares.flatten(1)).sum() / masked_squares.sum()
    assert max_abs_diff(patchify(normalize_per_square(images, 8)), target) < 1e-5
    mask_grid = masked_squares.repeat_interleave(2, 1).repeat_interleave(2, 2)  # the model's 4 px grid
    loss = simmim_loss(images, reconstruction, mask_grid, 4, "l2", "mask_patch", mask_patch_size=8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_layer_decay_groups_of_a_resnet50_are_sparks():
    """SparK's resnets_get_layer_id_and_scale_exp on ResNet-50 (downstream_imagenet/models/__init__.py), by hand:
    stem 0, layer1 1, layer2 blocks (0, 1) 2 and (2, 3) 3, layer3 blocks 0-2 4 and 3-5 5, layer4 6, head 7; the
    learning rate of id k is lr * 0.7 ** (7 - k)."""
    with torch.device("meta"):
        model = SimMIMForImageClassification(SimMIMConfig.from_preset("resnet50-224", num_labels=10))
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, layer_decay=0.7)
    layer_of = {name: group["layer_id"] for group in groups for name in group["names"]}
    expected = {
        "simmim.encoder.stem.convolution.weight": 0, "simmim.encoder.stages.0.layers.2.layer.0.convolution.weight": 1,
        "simmim.encoder.stages.1.layers.0.shortcut.convolution.weight": 2,
        "simmim.encoder.stages.1.layers.1.layer.2.normalization.bias": 2,
        "simmim.encoder.stages.1.layers.2.layer.1.convolution.weight": 3,
        "simmim.encoder.stages.2.layers.2.layer.0.convolution.weight": 4,
        "simmim.encoder.stages.2.layers.3.layer.0.convolution.weight": 5,
        "simmim.encoder.stages.3.layers.2.layer.2.normalization.weight": 6, "classifier.weight": 7,
    }
    assert {name: layer_of.get(name) for name in expected} == expected
    assert {group["layer_id"]: group["lr"] for group in groups} == pytest.approx({k: 0.7 ** (7 - k) for k in range(8)})


def test_layer_decay_groups_of_a_convnextv2_are_the_official_single_ids():
    """ConvNeXt V2's get_num_layer_for_convnext_single on depths [1, 2, 1] (main_finetune.py: num_layers = sum(depths),
    scales layer_decay ** (num_layers + 1 - i)): the stem and first block 1, the second stage's downsampling and first
    block 2, its second block 3, the third's 4; the head and its norm 5."""
    model = SimMIMForImageClassification(config_of("convnextv2", num_labels=3))
    groups = layer_decay_parameter_groups(model, learning_rate=1.0, layer_decay=0.5)
    layer_of = {name: group["layer_id"] for group in groups for name in group["names"]}
    prefix = "simmim.encoder."
    expected = {
        prefix + "stem.convolution.weight": 1, prefix + "stages.0.layers.0.grn.weight": 1,
        prefix + "stages.1.downsampling_layer.1.weight": 2, prefix + "stages.1.layers.1.dwconv.weight": 3,
        prefix + "stages.2.layers.0.pwconv2.bias": 4, "simmim.pooler.fc_norm.weight": 5, "classifier.bias": 5,
    }
    assert {name: layer_of[name] for name in expected} == expected
    expected_lr = {k: 0.5 ** (5 - k) for k in range(1, 6)}
    assert {group["layer_id"]: group["lr"] for group in groups} == pytest.approx(expected_lr)


def test_weight_decay_follows_spark_in_pretraining():
    """Not decayed: 1-D parameters, biases, the encoder's mask token (token mode) and the decoder's mask tokens
    (SparK exempts every `mask_token`); GRN's scale is decayed in pretraining (FCMAE), exempt in fine-tuning."""
    for conv_masking in ("sparse", "token"):
        model = SimMIMForMaskedImageModeling(config_of("convnextv2", conv_masking=conv_masking))
        exempt = no_weight_decay_parameter_names(model)
        multi_dim = {name for name, param in model.named_parameters() if param.ndim > 1 and ".bias" not in name}
        expected = {name for name in multi_dim if name.endswith("mask_token")}
        assert exempt & multi_dim == expected
        assert len(expected) == (3 if conv_masking == "sparse" else 1)
    classifier = SimMIMForImageClassification(config_of("convnextv2", num_labels=3))
    assert "simmim.encoder.stages.0.layers.0.grn.weight" in no_weight_decay_parameter_names(classifier)
    assert "simmim.encoder.stages.0.layers.0.grn.weight" not in exempt


def test_masked_batch_norm_is_what_the_models_hold():
    """Every batch norm of a ResNet pretraining model (encoder and decoder) can skip masked positions and be
    synchronised across processes (`convert_to_sync_batchnorm`): none is a plain `nn.BatchNorm2d`."""
    model = SimMIMForMaskedImageModeling(config_of("resnet"))
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms and all(isinstance(module, MaskedBatchNorm2d) for module in norms)
