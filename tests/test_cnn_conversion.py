"""transformers' ResNet / ConvNext / ConvNextV2 checkpoints in and out, folder to folder: a `ResNetModel`,
`ConvNextModel`, `ConvNextV2Model` or their image classifiers (saved locally from random tiny configs) become our
pretraining model with the same encoder; ours go back to transformers' own classes (base model and classifier), which
load them with `from_pretrained` and compute the same outputs within 1e-5, with an image processor
`AutoImageProcessor` loads. The configs map onto transformers' defaults (microsoft/resnet-50,
facebook/convnext-tiny-224) and our presets."""

import pytest
import torch
from conftest import max_abs_diff, randomize_batch_norms_, tiny_convnext, tiny_convnextv2, tiny_resnet
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextModel,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2Model,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
)

from hf_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMModel,
    cli,
)
from hf_simmim.convert import config_from_transformers, convert_transformers_checkpoint, export_to_transformers
from hf_simmim.convert.cnn_weights import transformers_cnn_config

ATOL = 1e-5
SIZE = 64
# Tiny transformers configs of each layout (ResNet: bottleneck layers, as microsoft/resnet-50).
THEIRS = {
    "resnet": (
        ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], num_labels=3),
        ResNetModel, ResNetForImageClassification,
    ),
    "convnext": (
        ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], image_size=SIZE, layer_scale_init_value=0.5,
                       layer_norm_eps=1e-12, num_labels=3),
        ConvNextModel, ConvNextForImageClassification,
    ),
    "convnextv2": (
        ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], image_size=SIZE, num_labels=3),
        ConvNextV2Model, ConvNextV2ForImageClassification,
    ),
}
OURS = {"resnet": tiny_resnet(), "convnext": tiny_convnext(), "convnextv2": tiny_convnextv2()}
# transformers' ResNet config has no image size; the decoder kept small
OVERRIDES = dict(image_size=SIZE, decoder_hidden_size=64)


def pixels(size=SIZE, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_states_close(ours, theirs):
    assert len(ours) == len(theirs)
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and max_abs_diff(a, b) < ATOL, level


# ---------------------------------------------------------------------------------------------- in
@pytest.mark.parametrize("name", sorted(THEIRS))
@pytest.mark.parametrize("classifier", [False, True], ids=["model", "classifier"])
def test_a_transformers_checkpoint_becomes_our_pretraining_model_with_the_same_encoder(name, classifier, tmp_path):
    config, base_class, classifier_class = THEIRS[name]
    theirs = randomize_batch_norms_((classifier_class if classifier else base_class)(config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    converted = convert_transformers_checkpoint(str(tmp_path / "theirs"), str(tmp_path / "ours"), **OVERRIDES)
    assert isinstance(converted, SimMIMForMaskedImageModeling)
    assert (converted.config.conv_masking, converted.config.norm_target) == ("sparse", "mask_patch")
    ours = SimMIMModel.from_pretrained(tmp_path / "ours").eval()
    x = pixels()
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True).hidden_states
        for mask in (None, torch.zeros(2, SIZE // 4, SIZE // 4, dtype=torch.bool)):
            assert_states_close(ours(x, bool_masked_pos=mask, output_hidden_states=True).hidden_states, expected)
    if classifier:
        assert converted.config.id2label == theirs.config.id2label


def test_transformers_default_configs_are_our_presets():
    """microsoft/resnet-50, facebook/convnext-tiny-224 and facebook/convnextv2-tiny-1k-224 are transformers' default
    configs: they convert to the encoders of our presets, and our presets export to them."""
    common = ("num_channels", "hidden_sizes", "depths", "hidden_act")
    cases = [
        (ResNetConfig(), "resnet50-224", ("embedding_size", "layer_type")),
        (ConvNextConfig(), "convnext-tiny-224", ("patch_size", "image_size", "layer_scale_init_value")),
        (ConvNextV2Config(), "convnextv2-tiny-224", ("patch_size", "image_size")),
    ]
    for theirs, preset, own in cases:
        theirs_fields = {f: theirs.to_dict()[f] for f in common + own}
        converted, ours = config_from_transformers(theirs), SimMIMConfig.from_preset(preset)
        assert {f: getattr(converted, f) for f in common + own} == theirs_fields
        assert {f: getattr(ours, f) for f in common + own} == theirs_fields
        assert (converted.backbone, converted.convnext_version) == (ours.backbone, ours.convnext_version)
        # stochastic depth as theirs: transformers' ResNet has none, its ConvNeXts say it
        assert converted.drop_path_rate == theirs.to_dict().get("drop_path_rate", 0.0)
        exported = transformers_cnn_config(ours).to_dict()
        assert {f: exported[f] for f in common + own} == theirs_fields


def test_a_resnet_that_downsamples_elsewhere_is_refused_naming_the_field(tmp_path):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], downsample_in_bottleneck=True)
    ResNetModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="downsample_in_bottleneck=True"):
        convert_transformers_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------- out
@pytest.mark.parametrize("name", sorted(OURS))
def test_our_classifier_exports_to_transformers_own_class(name, tmp_path):
    classifier = SimMIMForImageClassification(SimMIMConfig(**OURS[name], num_labels=3))
    ours = randomize_batch_norms_(classifier, seed=2).eval()
    theirs = export_to_transformers(ours, str(tmp_path))
    assert type(theirs) is THEIRS[name][2]
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is THEIRS[name][2]
    x = pixels(32, seed=1)
    with torch.no_grad():
        expected = ours(x, output_hidden_states=True)
        actual = reloaded(x, output_hidden_states=True)
    assert max_abs_diff(actual.logits, expected.logits) < ATOL
    assert_states_close(actual.hidden_states, expected.hidden_states)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__.startswith("ConvNextImageProcessor")


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_encoder_exports_with_its_pooler(name, tmp_path):
    """transformers' ResNet pools to (B, C, 1, 1), ours to (B, C); ConvNext normalises the pooled output with its
    final LayerNorm, our pooler's fc_norm."""
    ours = randomize_batch_norms_(SimMIMModel(SimMIMConfig(**OURS[name])), seed=3).eval()
    export_to_transformers(ours, str(tmp_path))
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is THEIRS[name][1]
    x = pixels(32, seed=2)
    with torch.no_grad():
        expected, actual = ours(x), reloaded(x)
    assert max_abs_diff(actual.last_hidden_state, expected.last_hidden_state) < ATOL
    assert max_abs_diff(actual.pooler_output.flatten(1), expected.pooler_output) < ATOL


def test_a_pretraining_model_exports_its_encoder_with_a_fresh_final_norm(tmp_path, caplog):
    ours = randomize_batch_norms_(SimMIMForMaskedImageModeling(SimMIMConfig(**tiny_convnextv2())), seed=4).eval()
    theirs = export_to_transformers(ours, str(tmp_path))
    assert type(theirs) is ConvNextV2Model
    assert torch.equal(theirs.layernorm.weight, torch.ones(24)) and not theirs.layernorm.bias.any()
    assert "decoder.proj.weight" in caplog.text and "fresh" in caplog.text
    x = pixels(32, seed=3)
    with torch.no_grad():
        assert_states_close(theirs(x, output_hidden_states=True).hidden_states,
                            ours.simmim(x, output_hidden_states=True).hidden_states)


def test_the_command_line_converts_both_ways(tmp_path):
    config, base_class, _ = THEIRS["convnextv2"]
    theirs = randomize_batch_norms_(base_class(config), seed=5).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    assert cli.main(["convert", "transformers", str(tmp_path / "theirs"), str(tmp_path / "ours")]) == 0
    assert cli.main(["convert", "to-transformers", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = ConvNextV2Model.from_pretrained(tmp_path / "back").eval()
    x = pixels(seed=4)
    with torch.no_grad():
        assert_states_close(back(x, output_hidden_states=True).hidden_states,
                            theirs(x, output_hidden_states=True).hidden_states)
