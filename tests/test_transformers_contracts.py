"""The contracts of a transformers model that the SimMIM classes keep, each checked against transformers' own classes
or hand-computed values: attention weights (eager and SDPA), `RuntimeError` on weights that do not fit the config,
`config.problem_type`, `config.return_dict`, a valid default config for every backbone, and load reports that list
only what was really missing, unexpected or re-initialised.

transformers' own common tests (`ModelTesterMixin`, `ConfigTester`) are run against these classes outside the
repository (their sdist); these tests keep the contracts that were once broken."""

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, perturb_parameters_, tiny_swin, tiny_vit
from transformers import BeitModel, SwinModel, ViTConfig, ViTForImageClassification
from transformers.modeling_utils import PreTrainedModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

from hf_simmim import (
    PRESETS,
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMModel,
)
from hf_simmim.convert import export_to_transformers

MODEL_CLASSES = (SimMIMModel, SimMIMForMaskedImageModeling, SimMIMForImageClassification)
BACKBONES = {"vit": tiny_vit(num_labels=3), "swin": tiny_swin(num_labels=3)}


def perturbed(model_class, fields, **overrides):
    torch.manual_seed(0)
    return perturb_parameters_(model_class(SimMIMConfig(**fields, **overrides))).eval()


def pixels(config, batch=2, seed=0):
    return torch.randn(batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))


def load_report(load):
    """Run `load()` and return what transformers logged while loading (its LOAD REPORT is a warning there)."""
    with CaptureLogger(transformers_logging.get_logger("transformers.modeling_utils")) as captured:
        result = load()
    return result, captured.out


# ---------------------------------------------------------------------------------------------- attention weights
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_attention_weights_are_transformers_own(backbone, tmp_path):
    """Every block's weights equal those of transformers' BEiT (the official ViT layout) / Swin holding the same
    weights, run eagerly; transformers' Swin returns the last block of each stage, ours every block."""
    ours = perturbed(SimMIMModel, BACKBONES[backbone])
    export_to_transformers(ours, str(tmp_path / "hf"))
    reference_class = BeitModel if backbone == "vit" else SwinModel
    reference = reference_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    pixel_values = pixels(ours.config)
    with torch.no_grad():
        actual = ours(pixel_values, output_attentions=True).attentions
        expected = reference(pixel_values, output_attentions=True).attentions
    config = ours.config
    if backbone == "vit":
        n = config.num_patches + 1
        assert [tuple(a.shape) for a in actual] == [(2, config.num_attention_heads, n, n)] * config.num_hidden_layers
    else:
        n = config.window_size**2  # every stage of this config is wider than a window
        windows = [(config.grid_size // 2**stage // config.window_size) ** 2 for stage in range(len(config.depths))]
        assert [tuple(a.shape) for a in actual] == [
            (2 * windows[stage], config.num_heads[stage], n, n)
            for stage, depth in enumerate(config.depths)
            for _ in range(depth)
        ]
        last_of_each_stage = [sum(config.depths[: stage + 1]) - 1 for stage in range(len(config.depths))]
        actual = [actual[i] for i in last_of_each_stage]
    assert len(actual) == len(expected)
    for block, (ours_weights, theirs) in enumerate(zip(actual, expected)):
        assert max_abs_diff(ours_weights, theirs) <= 1e-5, f"block {block}"


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_eager_and_sdpa_give_the_same_outputs(model_class, backbone, tmp_path):
    """SDPA is the default; `attn_implementation="eager"` computes the same outputs; asking SDPA for the weights runs
    the eager kernel for that call (with a warning) and returns the eager model's weights."""
    perturbed(model_class, BACKBONES[backbone]).save_pretrained(tmp_path)
    sdpa = model_class.from_pretrained(tmp_path)
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    pixel_values = pixels(sdpa.config)
    with torch.no_grad():
        expected = eager(pixel_values, output_attentions=True)
        assert sdpa(pixel_values).attentions is None
        actual = sdpa(pixel_values, output_attentions=True)
    main_output = {SimMIMModel: "last_hidden_state", SimMIMForMaskedImageModeling: "reconstruction"}
    key = main_output.get(model_class, "logits")
    assert max_abs_diff(actual[key], expected[key]) <= 1e-5
    assert len(actual.attentions) == len(expected.attentions) > 0
    for ours_weights, eager_weights in zip(actual.attentions, expected.attentions):
        assert max_abs_diff(ours_weights, eager_weights) <= 1e-6


def test_output_attentions_from_the_config_as_transformers():
    """`config.output_attentions` is the default of the argument; transformers refuses setting it under SDPA."""
    model = SimMIMModel._from_config(SimMIMConfig(**tiny_vit()), attn_implementation="eager").eval()
    model.config.output_attentions = True
    with torch.no_grad():
        assert len(model(pixels(model.config)).attentions) == model.config.num_hidden_layers
        assert model(pixels(model.config), output_attentions=False).attentions is None
    with pytest.raises(ValueError, match="eager"):
        SimMIMModel(SimMIMConfig(**tiny_vit())).config.output_attentions = True


# ---------------------------------------------------------------------------------------------- weights of other shapes
def test_weights_of_another_shape_raise_runtime_error_as_transformers(tmp_path, monkeypatch):
    """A classifier checkpoint loaded with another num_labels: transformers' ViT raises RuntimeError; ours too, before
    any weight is read and before any load report; with ignore_mismatched_sizes=True both re-initialise the head
    and report it."""
    theirs = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=4, num_labels=3)
    ViTForImageClassification(theirs).save_pretrained(tmp_path / "theirs")
    with pytest.raises(RuntimeError):
        ViTForImageClassification.from_pretrained(tmp_path / "theirs", num_labels=5)

    SimMIMForImageClassification(SimMIMConfig(**tiny_vit(num_labels=3))).save_pretrained(tmp_path / "ours")
    refused = r"classifier\.weight \(checkpoint \(3, 32\), model \(5, 32\)\).*ignore_mismatched_sizes=True"
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(lambda *a, **k: pytest.fail("loaded")))
        with CaptureLogger(transformers_logging.get_logger("transformers.modeling_utils")) as captured:
            with pytest.raises(RuntimeError, match=refused):
                SimMIMForImageClassification.from_pretrained(tmp_path / "ours", num_labels=5)
    assert "LOAD REPORT" not in captured.out
    (model, info), report = load_report(
        lambda: SimMIMForImageClassification.from_pretrained(
            tmp_path / "ours", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
        )
    )
    assert model.classifier.out_features == 5
    assert {key for key, _, _ in info["mismatched_keys"]} == {"classifier.weight", "classifier.bias"}
    assert "Reinit due to size mismatch" in report


# ---------------------------------------------------------------------------------------------- problem types
def tiny_classifiers(num_labels, problem_type=None):
    """Ours and transformers' ViT classifier, same label count and problem type."""
    torch.manual_seed(0)
    ours = SimMIMForImageClassification(SimMIMConfig(**tiny_vit(num_labels=num_labels, problem_type=problem_type)))
    theirs = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=4, num_labels=num_labels, problem_type=problem_type)
    )
    return ours, theirs


LABELS = {
    "one float label": (1, lambda: torch.tensor([0.5, -1.0])),
    "class indices": (3, lambda: torch.tensor([0, 2])),
    "float multi-hot": (3, lambda: torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
}


@pytest.mark.parametrize("name", sorted(LABELS))
def test_problem_type_is_inferred_as_transformers_infers_it(name):
    num_labels, make_labels = LABELS[name]
    ours, theirs = tiny_classifiers(num_labels)
    x = pixels(ours.config)
    ours(x, labels=make_labels())
    theirs(x, labels=make_labels())
    assert theirs.config.problem_type is not None
    assert ours.config.problem_type == theirs.config.problem_type


@pytest.mark.parametrize(
    "problem_type, num_labels, labels, reference",
    [
        ("regression", 1, torch.tensor([0.5, -1.0]), lambda logits, y: F.mse_loss(logits.squeeze(-1), y)),
        ("single_label_classification", 3, torch.tensor([0, 2]), F.cross_entropy),
        (
            "multi_label_classification",
            3,
            torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            F.binary_cross_entropy_with_logits,
        ),
        (  # soft targets (mixup / cutmix): the cross-entropy against the class probabilities
            "single_label_classification",
            3,
            torch.tensor([[0.7, 0.1, 0.2], [0.0, 0.4, 0.6]]),
            lambda logits, y: -(y * logits.log_softmax(-1)).sum(-1).mean(),
        ),
    ],
)
def test_loss_of_each_problem_type(problem_type, num_labels, labels, reference):
    ours, _ = tiny_classifiers(num_labels, problem_type)
    out = ours(pixels(ours.config), labels=labels)
    assert out.loss.item() == pytest.approx(reference(out.logits, labels).item(), rel=1e-6)


def test_soft_targets_without_problem_type_are_multi_label_as_transformers_and_warn(caplog):
    ours, _ = tiny_classifiers(3)
    soft = torch.tensor([[0.7, 0.1, 0.2], [0.0, 0.4, 0.6]])
    transformers_logging.warning_once.cache_clear()  # once per process: another test may have warned already
    out = ours(pixels(ours.config), labels=soft)
    assert ours.config.problem_type == "multi_label_classification"
    assert out.loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(out.logits, soft).item(), rel=1e-6)
    assert 'problem_type="single_label_classification"' in caplog.text
    # Class indices later (evaluation) then name the fix, where transformers fails inside BCE on the shapes.
    with pytest.raises(ValueError, match="problem_type='single_label_classification'"):
        ours(pixels(ours.config), labels=torch.tensor([0, 2]))


# ---------------------------------------------------------------------------------------------- return_dict
@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_config_return_dict_false_gives_tuples(model_class):
    model = model_class(SimMIMConfig(**tiny_vit(num_labels=3))).eval()
    x = pixels(model.config)
    with torch.no_grad():
        expected = model(x, output_hidden_states=True).to_tuple()
        model.config.return_dict = False
        actual = model(x, output_hidden_states=True)
        assert not isinstance(model(x, return_dict=True), tuple)  # the argument still wins over the config
    assert type(actual) is tuple and len(actual) == len(expected)
    for a, b in zip(actual, expected):
        if isinstance(b, tuple):  # hidden_states
            assert len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))
        else:
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- config defaults
def test_default_config_is_valid_for_every_backbone():
    """Unset geometry follows the backbone: Swin's defaults are the paper's Swin-B (the swin-base-window6-192
    preset), ViT's the paper's ViT-B/16, ResNet's and ConvNeXt's ResNet-50 and ConvNeXt-T; the model builds and
    reconstructs images of the configured size."""
    paper = PRESETS["swin-base-window6-192"]
    swin = SimMIMConfig(backbone="swin")
    for field in ("image_size", "patch_size", "window_size", "embed_dim", "depths", "num_heads"):
        assert getattr(swin, field) == paper[field], field
    vit = SimMIMConfig()
    assert (vit.image_size, vit.patch_size) == (PRESETS["vit-base-patch16-224"]["image_size"], 16)
    # the CNNs' are transformers' own defaults (microsoft/resnet-50, facebook/convnext-tiny-224): see test_cnn_models
    cnns = [SimMIMConfig(backbone="resnet"), SimMIMConfig(backbone="convnext", convnext_version=2)]
    for config in (swin, vit, *cnns):
        with torch.device("meta"):
            model = SimMIMForMaskedImageModeling(config)
            grid = torch.zeros(1, config.grid_size, config.grid_size, dtype=torch.bool)
            out = model(torch.empty(1, 3, config.image_size, config.image_size), bool_masked_pos=grid)
        assert out.reconstruction.shape == (1, 3, config.image_size, config.image_size)


def test_saved_configs_keep_their_geometry(tmp_path):
    """What a config resolved is saved: a Swin config at 224 px reloads at 224, not at the backbone default."""
    SimMIMConfig(backbone="swin", image_size=224, window_size=7).save_pretrained(tmp_path)
    loaded = SimMIMConfig.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.patch_size, loaded.window_size) == (224, 4, 7)


# ---------------------------------------------------------------------------------------------- load reports
RESIZED = {  # checkpoint fields, loading overrides, a key interpolated
    "swin window 4 -> 8": (tiny_swin(), dict(window_size=8), "layers.1.blocks.1.attn.relative_position_bias_table"),
    "vit 32 px -> 48 px": (
        tiny_vit(use_absolute_position_embeddings=True), dict(image_size=48), "simmim.encoder.pos_embed"
    ),
}


@pytest.mark.parametrize("name", sorted(RESIZED))
def test_interpolated_position_tables_are_not_reported(name, tmp_path, caplog):
    fields, overrides, interpolated_key = RESIZED[name]
    perturbed(SimMIMForMaskedImageModeling, fields).save_pretrained(tmp_path)
    caplog.set_level(logging.INFO, logger="hf_simmim.models.modeling_simmim")
    (model, info), report = load_report(
        lambda: SimMIMForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True, **overrides)
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "LOAD REPORT" not in report
    assert "interpolated" in caplog.text and interpolated_key in caplog.text


def test_shared_table_copied_into_blocks_is_not_reported(tmp_path, caplog):
    source = perturbed(SimMIMForMaskedImageModeling, tiny_vit())
    source.save_pretrained(tmp_path)
    caplog.set_level(logging.INFO, logger="hf_simmim.models.modeling_simmim")
    (model, info), report = load_report(
        lambda: SimMIMForImageClassification.from_pretrained(
            tmp_path, num_labels=3, use_relative_position_bias=True, use_shared_relative_position_bias=False,
            output_loading_info=True,
        )
    )
    shared = source.simmim.encoder.rel_pos_bias.relative_position_bias_table
    for block in model.simmim.encoder.blocks:
        assert torch.equal(block.rel_pos_bias.relative_position_bias_table, shared)
    # What is truly new: the head and the fine-tuning norm of the mean-pooled tokens.
    new = {"classifier.weight", "classifier.bias", "simmim.pooler.fc_norm.weight", "simmim.pooler.fc_norm.bias"}
    assert set(info["missing_keys"]) == new
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert "rel_pos_bias" not in report and "classifier.weight" in report
    assert "started 2 per-block relative position tables from the shared one" in caplog.text
