"""The convolutional encoders (ResNet, ConvNeXt V1/V2) on their own: parity with transformers' ResNetModel /
ConvNextModel / ConvNextV2Model through the weight conversion (both directions), masking that never lets the pixels
under the mask reach the encoder, `sparse` masking equal to transformers' model on the visible crop (what a
submanifold sparse convolution computes), the official layer ids and weight-decay exemptions, gradient checkpointing,
compilation, channels-last, synchronised batch norm, and the SparK-style hierarchical decoder."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import max_abs_diff, randomize_batch_norms_
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextModel,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ConvNextV2Model,
    PretrainedConfig,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
)

from hf_simmim.convert.cnn_weights import cnn_state_dict_from_transformers, cnn_state_dict_to_transformers
from hf_simmim.models.masking import SimMIMMaskGenerator
from hf_simmim.models.modeling_conv_masking import (
    HierarchicalDecoder,
    MaskedBatchNorm2d,
    convert_to_sync_batchnorm,
    visible_at,
)
from hf_simmim.models.modeling_convnext import ConvNextEncoder
from hf_simmim.models.modeling_resnet import ResNetEncoder
from hf_simmim.models.modeling_simmim import simmim_loss
from hf_simmim.training.optim import no_weight_decay_parameter_names, parameter_layer_ids

ATOL = 1e-5
COMMON = dict(num_channels=3, mask_token_type="learned", initializer_range=0.02, layer_norm_eps=1e-12)
TINY = {
    "resnet": dict(
        backbone="resnet", embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1],
        layer_type="bottleneck", hidden_act="relu", drop_path_rate=0.0,
    ),
    "resnet-basic": dict(
        backbone="resnet", embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 1, 1], layer_type="basic",
        hidden_act="relu", drop_path_rate=0.0,
    ),
    "convnext": dict(
        backbone="convnext", patch_size=4, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], hidden_act="gelu",
        drop_path_rate=0.0, layer_scale_init_value=0.5, convnext_version=1, layer_decay_type="single",
    ),
    "convnextv2": dict(
        backbone="convnext", patch_size=4, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], hidden_act="gelu",
        drop_path_rate=0.0, layer_scale_init_value=0.0, convnext_version=2, layer_decay_type="single",
    ),
}
MODEL_TYPES = {"resnet": "resnet", "resnet-basic": "resnet", "convnext": "convnext", "convnextv2": "convnextv2"}
MODES = ("token", "sparse")


def cnn_config(name, conv_masking="token", **overrides):
    return PretrainedConfig(**{**COMMON, **TINY[name], "conv_masking": conv_masking, **overrides})


def build_encoder(config, use_mask_token=True):
    encoder_class = ResNetEncoder if config.backbone == "resnet" else ConvNextEncoder
    return encoder_class(config, use_mask_token=use_mask_token)


def transformers_classes(name):
    """(config class, base model class, classifier class) of transformers for a tiny backbone."""
    return {
        "resnet": (ResNetConfig, ResNetModel, ResNetForImageClassification),
        "convnext": (ConvNextConfig, ConvNextModel, ConvNextForImageClassification),
        "convnextv2": (ConvNextV2Config, ConvNextV2Model, ConvNextV2ForImageClassification),
    }[MODEL_TYPES[name]]


def transformers_config(config, num_labels=2):
    fields = dict(num_channels=config.num_channels, hidden_sizes=config.hidden_sizes, depths=config.depths)
    fields.update(hidden_act=config.hidden_act, num_labels=num_labels)
    if config.backbone == "resnet":
        fields.update(embedding_size=config.embedding_size, layer_type=config.layer_type)
        return fields
    fields.update(patch_size=config.patch_size, drop_path_rate=0.0, layer_norm_eps=config.layer_norm_eps)
    if config.convnext_version == 1:
        fields.update(layer_scale_init_value=config.layer_scale_init_value)
    return fields


def their_model(name, config, classifier=False, seed=0):
    config_class, base_class, classifier_class = transformers_classes(name)
    model_class = classifier_class if classifier else base_class
    return randomize_batch_norms_(model_class(config_class(**transformers_config(config))), seed).eval()


def load_converted(encoder, converted):
    """Our weights (`SimMIMModel` keys) into `encoder`; returns the pooler norm's weights (ConvNext only)."""
    own = {key.removeprefix("encoder."): value for key, value in converted.items() if key.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(own, strict=False)
    assert not unexpected and set(missing) <= {"mask_token"}
    return {key.removeprefix("pooler.fc_norm."): v for key, v in converted.items() if key.startswith("pooler.")}


def pixels(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_masks(batch=2, size=64, seed=0):
    """SimMIM masks of 8-pixel squares at the stride-4 patch grid, `(B, size / 4, size / 4)`."""
    torch.manual_seed(seed)
    generator = SimMIMMaskGenerator(input_size=size, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)
    return torch.stack([torch.as_tensor(generator()) for _ in range(batch)]).bool()


def assert_states_close(ours, theirs, atol=ATOL):
    assert len(ours) == len(theirs)
    for level, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, level
        assert max_abs_diff(a, b) < atol, f"hidden state {level}: {max_abs_diff(a, b)}"


# ---------------------------------------------------------------------------------------------- transformers parity
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("conv_masking", MODES)
def test_unmasked_encoder_equals_transformers_on_converted_weights(name, conv_masking):
    config = cnn_config(name, conv_masking)
    theirs = their_model(name, config)
    encoder = build_encoder(config).eval()
    pooler_norm = load_converted(encoder, cnn_state_dict_from_transformers(theirs.state_dict(), MODEL_TYPES[name]))
    x = pixels()
    with torch.no_grad():
        expected = theirs(x, output_hidden_states=True)
        for mask in (None, torch.zeros(2, 16, 16, dtype=torch.bool)):
            ours = encoder(x, mask, output_hidden_states=True)
            assert_states_close(ours.hidden_states, expected.hidden_states)
            assert max_abs_diff(ours.last_hidden_state, expected.last_hidden_state) < ATOL
    if config.backbone == "convnext":  # transformers' final LayerNorm is our pooler's fc_norm
        norm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        norm.load_state_dict(pooler_norm)
        pooled = norm(encoder.patch_tokens(ours.last_hidden_state).mean(dim=1))
        assert max_abs_diff(pooled, expected.pooler_output) < ATOL


@pytest.mark.parametrize("name", ["resnet", "resnet-basic"])
def test_sparse_batch_norm_trains_as_transformers_with_an_empty_mask(name):
    """Training statistics over all positions (nothing masked) and the running statistics they update."""
    config = cnn_config(name, "sparse")
    # float64: with batch statistics over a few positions, float32 rounding alone nears the tolerance
    theirs = their_model(name, config).train().double()
    encoder = build_encoder(config).train().double()
    load_converted(encoder, cnn_state_dict_from_transformers(theirs.state_dict(), "resnet"))
    x = pixels().double()
    expected = theirs(x, output_hidden_states=True)
    ours = encoder(x, torch.zeros(2, 16, 16, dtype=torch.bool), output_hidden_states=True)
    assert_states_close(ours.hidden_states, expected.hidden_states)
    their_buffers = dict(theirs.named_buffers())
    converted = cnn_state_dict_from_transformers(their_buffers, "resnet")
    for key, value in encoder.named_buffers():
        assert max_abs_diff(value, converted["encoder." + key]) < ATOL, key


@pytest.mark.parametrize("name", list(TINY))
def test_export_to_transformers_gives_the_same_model_and_classifier(name):
    config = cnn_config(name)
    encoder = randomize_batch_norms_(build_encoder(config), seed=3).eval()
    ours = {"encoder." + key: value for key, value in encoder.state_dict().items()}
    head = nn.Linear(config.hidden_sizes[-1], 2)
    norm = randomize_batch_norms_(nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps), seed=4)
    if config.backbone == "convnext":
        ours.update({"pooler.fc_norm." + key: value for key, value in norm.state_dict().items()})
    exported, dropped = cnn_state_dict_to_transformers(ours, MODEL_TYPES[name])
    assert dropped == ["encoder.mask_token"]
    config_class, base_class, classifier_class = transformers_classes(name)
    theirs = base_class(config_class(**transformers_config(config))).eval()
    theirs.load_state_dict(exported, strict=True)
    x = pixels(seed=1)
    with torch.no_grad():
        expected = encoder(x, output_hidden_states=True)
        assert_states_close(theirs(x, output_hidden_states=True).hidden_states, expected.hidden_states)
        pooled = encoder.patch_tokens(expected.last_hidden_state).mean(dim=1)
        logits = head(norm(pooled) if config.backbone == "convnext" else pooled)
    classifier_weights = {"simmim." + key: value for key, value in ours.items()}
    classifier_weights.update({"classifier." + key: value for key, value in head.state_dict().items()})
    exported, _ = cnn_state_dict_to_transformers(classifier_weights, MODEL_TYPES[name])
    classifier = classifier_class(config_class(**transformers_config(config))).eval()
    classifier.load_state_dict(exported, strict=True)
    with torch.no_grad():
        assert max_abs_diff(classifier(x).logits, logits) < ATOL


@pytest.mark.parametrize("name", ["resnet", "convnextv2"])
def test_transformers_classifier_round_trips_through_our_keys(name):
    config = cnn_config(name)
    theirs = their_model(name, config, classifier=True).state_dict()
    ours = cnn_state_dict_from_transformers(theirs, MODEL_TYPES[name])
    assert "classifier.weight" in ours and any(key.startswith("simmim.encoder.stages.") for key in ours)
    back, dropped = cnn_state_dict_to_transformers(ours, MODEL_TYPES[name])
    assert not dropped and back.keys() == theirs.keys()
    assert all(torch.equal(back[key], theirs[key]) for key in theirs)


# The sizes of microsoft/resnet-50, facebook/convnext-tiny-224 and facebook/convnextv2-tiny-1k-224.
FULL_SIZES = {
    "resnet": dict(TINY["resnet"], embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3]),
    "convnext": dict(TINY["convnext"], hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
    "convnextv2": dict(TINY["convnextv2"], hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
}


@pytest.mark.parametrize("name", list(FULL_SIZES))
def test_full_size_layouts_convert_key_for_key(name):
    """Those checkpoints' layouts are transformers' default configs: built on the meta device, every weight of their
    classifier maps onto ours with its shape, and back."""
    fields = FULL_SIZES[name]
    config_class, _, classifier_class = transformers_classes(name)
    with torch.device("meta"):
        theirs = classifier_class(config_class()).state_dict()
        config = PretrainedConfig(**{**COMMON, **fields, "conv_masking": "token"})
        ours = {f"simmim.encoder.{key}": value for key, value in build_encoder(config).state_dict().items()}
    converted = cnn_state_dict_from_transformers(theirs, MODEL_TYPES[name])
    head = {"classifier.weight", "classifier.bias"} | {k for k in converted if k.startswith("simmim.pooler.")}
    assert converted.keys() - head == ours.keys() - {"simmim.encoder.mask_token"}
    assert all(converted[key].shape == ours[key].shape for key in converted.keys() - head)
    assert cnn_state_dict_to_transformers(converted, MODEL_TYPES[name])[0].keys() == theirs.keys()


def test_unknown_weights_are_refused():
    with pytest.raises(ValueError, match="Unrecognised weights"):
        cnn_state_dict_from_transformers({"embeddings.position_embeddings": torch.zeros(1)}, "convnext")


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("conv_masking", MODES)
@pytest.mark.parametrize("training", [False, True])
def test_pixels_under_the_mask_do_not_reach_the_encoder(name, conv_masking, training):
    config = cnn_config(name, conv_masking, drop_path_rate=0.3)
    encoder = randomize_batch_norms_(build_encoder(config), seed=5).train(training)
    x, mask = pixels(seed=2), random_masks(seed=2)
    under_mask = 1.0 - visible_at(mask, (64, 64))
    changed = x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) * under_mask

    def run(images, masks):
        torch.manual_seed(0)  # the same drop-path draws in both runs
        return encoder(images, masks, output_hidden_states=True).hidden_states

    for before, after in zip(run(x, mask), run(changed, mask)):
        assert torch.equal(before, after)
    # the change is one the encoder would see without the mask
    assert max_abs_diff(run(x, None)[-1], run(changed, None)[-1]) > 1e-3


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("training", [False, True])
def test_sparse_encoder_equals_transformers_on_the_visible_crop(name, training):
    """Everything masked but a 64x64 rectangle aligned to the stride 32: at every stage, our `sparse` encoder on the
    full image equals transformers' model on the crop (zero padding = masked positions held at 0; batch norm and GRN
    statistics = the crop's), and masked positions hold 0."""
    config = cnn_config(name, "sparse")
    # float64: the crop runs other convolution kernels than the full image, and float32 rounding of these noisy
    # weights' large activations alone nears the tolerance
    theirs = their_model(name, config).train(training).double()
    encoder = build_encoder(config).train(training).double()
    load_converted(encoder, cnn_state_dict_from_transformers(theirs.state_dict(), MODEL_TYPES[name]))
    x = pixels(size=128, seed=4).double()
    mask = torch.ones(2, 32, 32, dtype=torch.bool)
    mask[:, 8:24, 16:32] = False  # pixels 32..95 x 64..127
    ours = encoder(x, mask, output_hidden_states=True).hidden_states
    expected = theirs(x[:, :, 32:96, 64:128], output_hidden_states=True).hidden_states
    for level, (full, crop) in enumerate(zip(ours, expected)):
        stride = 128 // full.shape[-1]
        rows, cols = slice(32 // stride, 96 // stride), slice(64 // stride, 128 // stride)
        assert max_abs_diff(full[:, :, rows, cols], crop) < ATOL, level
        outside = full.clone()
        outside[:, :, rows, cols] = 0
        assert not outside.any(), level
    if training:  # batch norm running statistics updated from the visible positions only
        converted = cnn_state_dict_from_transformers(dict(theirs.named_buffers()), MODEL_TYPES[name])
        for key, value in encoder.named_buffers():
            assert max_abs_diff(value, converted["encoder." + key]) < ATOL, key


@pytest.mark.parametrize("name", list(TINY))
def test_token_mode_is_transformers_with_filled_pixels_and_the_mask_token_at_the_stem(name):
    config = cnn_config(name, "token")
    theirs = their_model(name, config)
    encoder = randomize_batch_norms_(build_encoder(config), seed=6).eval()
    load_converted(encoder, cnn_state_dict_from_transformers(theirs.state_dict(), MODEL_TYPES[name]))
    x, mask = pixels(seed=3), random_masks(seed=3)
    stem_visible = (~mask).float().unsqueeze(1)  # the stem output is at the stride-4 patch grid
    token = encoder.mask_token.detach().reshape(1, -1, 1, 1)
    stem = theirs.embedder if config.backbone == "resnet" else theirs.embeddings
    hook = stem.register_forward_hook(lambda module, args, out: out * stem_visible + token * (1 - stem_visible))
    with torch.no_grad():
        expected = theirs(x * visible_at(mask, (64, 64)), output_hidden_states=True).hidden_states
        ours = encoder(x, mask, output_hidden_states=True).hidden_states
    hook.remove()
    assert_states_close(ours, expected)


def test_coarse_maps_are_visible_where_any_covered_cell_is():
    mask = torch.tensor([[[True, True, True, False], [True, True, True, True]] + [[True] * 4] * 2])
    assert visible_at(mask, (2, 2))[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert visible_at(mask, (8, 8))[0, 0, :2].tolist() == [[0.0] * 6 + [1.0] * 2] * 2
    with pytest.raises(ValueError, match="not multiples"):
        visible_at(mask, (6, 6))


def test_resnet_drop_path_rises_linearly_over_the_layers_and_acts_in_training_only():
    """timm's ResNet (what SparK fine-tunes): layer i of n drops its residual branch with rate * i / (n - 1)."""
    encoder = build_encoder(cnn_config("resnet", drop_path_rate=0.3))  # depths 1, 2, 1, 1: five layers
    rates = [layer.drop_path.drop_prob for stage in encoder.stages for layer in stage.layers]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    plain = build_encoder(cnn_config("resnet", drop_path_rate=0.0))
    plain.load_state_dict(encoder.state_dict())
    x = pixels(batch=8, seed=1)

    def last_state(model, training):
        torch.manual_seed(0)
        return model.train(training)(x, None, output_hidden_states=True).hidden_states[-1]

    assert torch.equal(last_state(encoder, False), last_state(plain, False))
    assert max_abs_diff(last_state(encoder, True), last_state(plain, True)) > 1e-3
    # where: on the residual branch, before the sum and the activation, rescaled by 1 / keep (timm's Bottleneck)
    layer = encoder.stages[1].layers[1].eval()  # an identity shortcut
    layer.drop_path.train()
    layer.drop_path.drop_prob = 0.5
    features = torch.randn(16, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    with torch.no_grad():
        out = layer(features)
        branch = features
        for convolution in layer.layer:
            branch = convolution(branch)
    dropped, kept = torch.relu(features), torch.relu(branch / 0.5 + features)
    outcomes = [
        "dropped" if torch.allclose(o, d, atol=1e-5) else "kept" if torch.allclose(o, k, atol=1e-5) else "neither"
        for o, d, k in zip(out, dropped, kept)
    ]
    assert set(outcomes) == {"dropped", "kept"}  # every sample one of the two, and both seen


def test_sparse_mode_has_no_encoder_mask_token():
    assert build_encoder(cnn_config("resnet", "sparse")).mask_token is None
    assert build_encoder(cnn_config("convnext", "token", mask_token_type="zeros")).mask_token is None
    assert build_encoder(cnn_config("convnext", "token")).mask_token.shape == (1, 1, 8)


# ---------------------------------------------------------------------------------------------- optimizer hooks
class EncoderHolder(nn.Module):
    """What `training.optim` reads from a model: its `encoder`."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


def test_convnext_group_layer_ids_are_the_official_ones():
    """ConvNeXt's `get_num_layer_for_convnext` on ConvNeXt-S/B depths, by hand: 14 ids, stage 3 in groups of 3."""
    with torch.device("meta"):
        encoder = build_encoder(cnn_config("convnext", depths=[3, 3, 27, 3], layer_decay_type="group"))
    expected = {
        "mask_token": 0, "stem.convolution.weight": 0, "stem.normalization.bias": 0,
        "stages.0.layers.2.dwconv.weight": 1, "stages.1.downsampling_layer.0.weight": 2,
        "stages.1.layers.1.pwconv1.weight": 2, "stages.2.downsampling_layer.1.bias": 3,
        "stages.2.layers.0.layernorm.weight": 3, "stages.2.layers.5.pwconv2.bias": 4,
        "stages.2.layers.26.layer_scale_parameter": 11, "stages.3.downsampling_layer.1.weight": 12,
        "stages.3.layers.2.pwconv2.weight": 12, "anything.else": 13,
    }
    assert {name: encoder.layer_id(name) for name in expected} == expected
    assert encoder.num_layers() == 14


def test_convnext_single_layer_ids_are_the_official_ones():
    """ConvNeXt V2's `get_num_layer_for_convnext_single` on ConvNeXt-T depths [3, 3, 9, 3], by hand."""
    with torch.device("meta"):
        encoder = build_encoder(cnn_config("convnextv2", depths=[3, 3, 9, 3]))
    expected = {
        "stem.convolution.weight": 1, "stages.0.layers.0.dwconv.weight": 1, "stages.0.layers.2.grn.weight": 3,
        "stages.1.downsampling_layer.1.weight": 4, "stages.1.layers.0.pwconv1.bias": 4,
        "stages.2.layers.8.pwconv2.weight": 15, "stages.3.downsampling_layer.0.bias": 16,
        "stages.3.layers.2.grn.bias": 18, "anything.else": 19,
    }
    assert {name: encoder.layer_id(name) for name in expected} == expected
    assert encoder.num_layers() == 20


def test_resnet_layer_ids_are_per_stage():
    model = EncoderHolder(build_encoder(cnn_config("resnet")))
    ids, num_layers = parameter_layer_ids(model)
    assert num_layers == 6
    assert ids["encoder.mask_token"] == ids["encoder.stem.convolution.weight"] == 0
    assert ids["encoder.stages.0.layers.0.shortcut.normalization.weight"] == 1
    assert ids["encoder.stages.1.layers.1.layer.2.convolution.weight"] == 2
    assert ids["encoder.stages.3.layers.0.layer.0.convolution.weight"] == 4


def test_weight_decay_exemptions_follow_spark_and_convnext_v2():
    """Decayed: the convolution and Linear weights; in fine-tuning GRN's scale is exempt (ConvNeXt V2's `.gamma`),
    in pretraining it is decayed (FCMAE); the mask token never is (SparK)."""
    model = EncoderHolder(build_encoder(cnn_config("convnextv2", depths=[1, 1], hidden_sizes=[8, 16])))
    names = {name for name, _ in model.named_parameters()}
    weights = ["stem.convolution", "stages.0.layers.0.dwconv", "stages.0.layers.0.pwconv1",
               "stages.0.layers.0.pwconv2", "stages.1.downsampling_layer.1", "stages.1.layers.0.dwconv",
               "stages.1.layers.0.pwconv1", "stages.1.layers.0.pwconv2"]
    decayed = {f"encoder.{name}.weight" for name in weights}
    grn = {"encoder.stages.0.layers.0.grn.weight", "encoder.stages.1.layers.0.grn.weight"}
    assert names - no_weight_decay_parameter_names(model, pretraining=False) == decayed
    assert names - no_weight_decay_parameter_names(model, pretraining=True) == decayed | grn


# ---------------------------------------------------------------------------------------------- runtime
def enable_checkpointing(encoder):
    for stage in encoder.stages:
        stage.gradient_checkpointing = True
        stage._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


@pytest.mark.parametrize("name", ["resnet", "convnextv2"])
def test_gradient_checkpointing_per_stage_gives_the_same_gradients(name):
    config = cnn_config(name, "sparse")
    x, mask = pixels(), random_masks()
    gradients = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        encoder = randomize_batch_norms_(build_encoder(config), seed=7).train()
        if checkpointed:
            enable_checkpointing(encoder)
        encoder(x, mask).last_hidden_state.square().sum().backward()
        gradients.append({key: param.grad for key, param in encoder.named_parameters()})
    for key, grad in gradients[0].items():
        assert max_abs_diff(grad, gradients[1][key]) < ATOL, key


@pytest.mark.parametrize("name, conv_masking", [("resnet", "sparse"), ("convnextv2", "token")])
def test_encoder_compiles_without_graph_breaks(name, conv_masking):
    """One whole graph (no data-dependent Python control flow): masked batch norm and the mask token fill."""
    encoder = randomize_batch_norms_(build_encoder(cnn_config(name, conv_masking)), seed=8).train()
    x, mask = pixels(), random_masks()
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    assert max_abs_diff(compiled(x, mask).last_hidden_state, encoder(x, mask).last_hidden_state) < ATOL


@pytest.mark.parametrize("name", ["resnet", "convnextv2"])
def test_channels_last_gives_the_same_outputs(name):
    encoder = randomize_batch_norms_(build_encoder(cnn_config(name, "sparse")), seed=9).eval().double()
    x, mask = pixels().double(), random_masks()  # float64: see the crop test
    with torch.no_grad():
        expected = encoder(x, mask, output_hidden_states=True).hidden_states
        encoder.to(memory_format=torch.channels_last)
        ours = encoder(x.to(memory_format=torch.channels_last), mask, output_hidden_states=True).hidden_states
    assert_states_close(ours, expected)


# ---------------------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize("name", ["resnet", "convnextv2"])
@pytest.mark.parametrize("conv_masking", MODES)
def test_hierarchical_decoder_reconstructs_full_images_and_trains(name, conv_masking):
    config = cnn_config(name, conv_masking, encoder_stride=32, decoder_hidden_size=64)
    torch.manual_seed(0)
    encoder, decoder = build_encoder(config).train(), HierarchicalDecoder(config).train()
    x, mask = pixels(batch=4, seed=5), random_masks(batch=4, seed=5)
    parameters = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    losses = []
    for _ in range(6):
        stages = encoder(x, mask, output_hidden_states=True).hidden_states[1:]
        reconstruction = decoder(stages, mask)
        assert reconstruction.shape == x.shape
        loss = simmim_loss(x, reconstruction, mask, 4, "l2")
        optimizer.zero_grad()
        loss.backward()
        assert all(param.grad is not None and param.grad.isfinite().all() for param in parameters)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # mask tokens fill the masked positions of the sparse maps (in `token` mode the encoder filled them): each
    # learns where its scale has masked positions (at stride 32, every cell here holds a visible 8-px square)
    tokens = [densify.mask_token for densify in decoder.densify if densify.mask_token is not None]
    assert len(tokens) == (len(config.depths) if conv_masking == "sparse" else 0)
    for token, stage in zip(tokens, reversed(stages)):
        has_masked = (visible_at(mask, stage.shape[-2:]) == 0).any().item()
        assert (token.grad.abs().sum() > 0).item() == has_masked
    assert conv_masking == "token" or tokens[-1].grad.abs().sum() > 0


def test_decoder_width_must_halve_down_to_the_pixels():
    with pytest.raises(ValueError, match="decoder_hidden_size=48"):
        HierarchicalDecoder(cnn_config("resnet", encoder_stride=32, decoder_hidden_size=48))


# ---------------------------------------------------------------------------------------------- synchronised BN
def _synced_batch_norm_worker(rank, init_file, inputs, visible, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    norm = randomize_batch_norms_(MaskedBatchNorm2d(4), seed=10).train()
    assert convert_to_sync_batchnorm(norm) == 1
    rows = slice(2 * rank, 2 * rank + 2)
    x = inputs[rows].clone().requires_grad_(True)
    out = norm(x, visible[rows])
    (out * torch.arange(4.0).reshape(1, 4, 1, 1)).sum().backward()
    dist.all_reduce(norm.weight.grad)
    torch.save(
        {"out": out.detach(), "input_grad": x.grad, "weight_grad": norm.weight.grad, "running": norm.running_var},
        os.path.join(result_dir, f"{rank}.pt"),
    )
    dist.destroy_process_group()


def test_synchronised_batch_norm_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    inputs = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(11))
    visible = (torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(12)) > 0.4).float()
    # forked, not spawned: the workers need nothing but what this process has already imported
    mp.start_processes(
        _synced_batch_norm_worker, args=(str(tmp_path / "init"), inputs, visible, str(tmp_path)), nprocs=2,
        start_method="fork",
    )
    norm = randomize_batch_norms_(MaskedBatchNorm2d(4), seed=10).train()
    x = inputs.clone().requires_grad_(True)
    out = norm(x, visible)
    (out * torch.arange(4.0).reshape(1, 4, 1, 1)).sum().backward()
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    assert max_abs_diff(torch.cat([r["out"] for r in results]), out) < ATOL
    assert max_abs_diff(torch.cat([r["input_grad"] for r in results]), x.grad) < ATOL
    assert max_abs_diff(results[0]["weight_grad"], norm.weight.grad) < ATOL
    assert max_abs_diff(results[0]["running"], norm.running_var) < ATOL


def test_masked_batch_norm_statistics_are_those_of_the_visible_positions():
    """SparK's way, by boolean indexing: BatchNorm1d over the visible feature vectors only."""
    x = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(13))
    visible = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(14)) > 0.5).float()
    norm, reference = MaskedBatchNorm2d(5).train(), nn.BatchNorm1d(5).train()
    out = norm(x, visible)
    rows = visible[:, 0].bool()
    expected = reference(x.permute(0, 2, 3, 1)[rows])
    assert max_abs_diff(out.permute(0, 2, 3, 1)[rows], expected) < ATOL
    assert not out.permute(0, 2, 3, 1)[~rows].any()
    assert max_abs_diff(norm.running_var, reference.running_var) < ATOL
    assert max_abs_diff(norm.running_mean, reference.running_mean) < ATOL


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("resnet", dict(conv_masking="dense"), "conv_masking='dense'"),
        ("resnet", dict(layer_type="wide"), "layer_type='wide'"),
        ("resnet", dict(depths=[1, 1]), "one entry per stage"),
        ("convnextv2", dict(layer_scale_init_value=1e-6), "ConvNeXt V2 has no layer scale"),
        ("convnext", dict(layer_decay_type="group", depths=[1, 1, 1], hidden_sizes=[8, 16, 24]), "needs 4 stages"),
        ("convnext", dict(convnext_version=3), "convnext_version=3"),
    ],
)
def test_bad_config_fields_are_named(name, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_encoder(cnn_config(name, **overrides))


def test_a_batch_with_nothing_visible_leaves_the_running_statistics_alone():
    norm = MaskedBatchNorm2d(3).train()
    features = torch.randn(2, 3, 4, 4) * 5 + 2
    norm(features, torch.ones(2, 1, 4, 4))
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    norm(features, torch.zeros(2, 1, 4, 4))  # a stage where every position is masked
    assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
