"""The optimizers our trainers build against the official `optimizer.build_optimizer` (microsoft/SimMIM's; for SwinV2
microsoft/Swin-Transformer's), through its reference fixtures (`../shared/fixtures/official_recipe/README.md`,
"Parameter groups"): the weight decay of every parameter in pretraining and fine-tuning, and the layer id and
learning-rate scale of every parameter in fine-tuning, for ViT, Swin and SwinV2. Official parameter names reach ours
through the checkpoint converter."""

import json
import math
import re

import pytest
import torch
from conftest import SHARED_DIR, require_shared_dir
from transformers import TrainingArguments

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling
from hf_simmim.convert import convert_official_checkpoint, convert_official_state_dict
from hf_simmim.training.optim import layer_decay_parameter_groups, no_weight_decay_parameter_names
from hf_simmim.training.schedules import SimMIMRecipe
from hf_simmim.training.trainer import SimMIMFineTuneTrainer, SimMIMTrainer

BACKBONES = ("vit", "swin", "swinv2")
REL_TOL = 1e-12  # the official lr_scale values are float64 products (README)
# The official ViT's query and value biases, which the converter merges into one qkv bias (SwinV2 keeps its own).
VIT_QV_BIAS = re.compile(r"^encoder\.blocks\.\d+\.attn\.[qv]_bias$")


def load_oracle(official_recipe_dir, stage, backbone):
    return json.loads((official_recipe_dir / f"param_groups_{stage}_{backbone}.json").read_text())


def official_checkpoint(official_fixtures_dir, backbone):
    """The official pretraining checkpoint the oracle's model was built as (SwinV2's is in `official_simmim_v2`)."""
    if backbone == "swinv2":
        folder = require_shared_dir(SHARED_DIR / "fixtures" / "official_simmim_v2", "official SimMIM SwinV2 fixtures")
        return str(folder / "swinv2" / "checkpoint.pth")
    return str(official_fixtures_dir / backbone / "checkpoint.pth")


def our_name(official_name, finetuning):
    """Our parameter name for an official one. Fine-tuning names lack the checkpoint's `encoder.` prefix, and the
    classifier's `head` and `fc_norm` are not in a pretraining checkpoint, so the converter does not map them."""
    if finetuning:
        for official, ours in (("head.", "classifier."), ("fc_norm.", "simmim.pooler.fc_norm.")):
            if official_name.startswith(official):
                return ours + official_name[len(official) :]
        official_name = "encoder." + official_name
    siblings = [official_name]
    if VIT_QV_BIAS.match(official_name):  # the converter merges them into one qkv bias
        stem = official_name[: -len("q_bias")]
        siblings = [stem + "q_bias", stem + "v_bias"]
    (name,) = convert_official_state_dict({key: torch.zeros(1) for key in siblings})
    return name


def finetuning_config(fields, **overrides):
    """Our config for the official fine-tuning classifier, from the yacs fields the fixture set."""
    backbone = fields["MODEL.TYPE"]
    model = {key.split(".")[-1]: value for key, value in fields.items() if key.startswith(f"MODEL.{backbone.upper()}.")}
    common = dict(
        backbone=backbone, image_size=fields["DATA.IMG_SIZE"], num_labels=fields["MODEL.NUM_CLASSES"],
        patch_size=model["PATCH_SIZE"], num_channels=model["IN_CHANS"], mlp_ratio=model["MLP_RATIO"],
        qkv_bias=model["QKV_BIAS"], drop_path_rate=fields["MODEL.DROP_PATH_RATE"],
    )
    if backbone == "vit":
        arch = dict(
            hidden_size=model["EMBED_DIM"], num_hidden_layers=model["DEPTH"], num_attention_heads=model["NUM_HEADS"],
            layer_scale_init_value=model["INIT_VALUES"], use_absolute_position_embeddings=model["USE_APE"],
            use_relative_position_bias=model["USE_RPB"], use_shared_relative_position_bias=model["USE_SHARED_RPB"],
            use_mean_pooling=model["USE_MEAN_POOLING"],
        )
    else:
        arch = dict(
            embed_dim=model["EMBED_DIM"], depths=model["DEPTHS"], num_heads=model["NUM_HEADS"],
            window_size=model["WINDOW_SIZE"], use_absolute_position_embeddings=model["APE"],
            patch_norm=model["PATCH_NORM"],
        )
    if backbone == "swinv2":
        arch["pretrained_window_sizes"] = model["PRETRAINED_WINDOW_SIZES"]
    return SimMIMConfig(**{**common, **arch, **overrides})


def built_optimizer(trainer_class, model, tmp_path, oracle, **kwargs):
    """The optimizer the trainer builds inside `train()`, as `{our parameter name: its param group}`."""
    fields = oracle["fields_set"]
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=fields["TRAIN.BASE_LR"], weight_decay=fields["TRAIN.WEIGHT_DECAY"],
        use_cpu=True, report_to="none",
    )
    optimizer = trainer_class(model=model, args=args, **kwargs).create_optimizer()
    group_of = {id(param): group for group in optimizer.param_groups for param in group["params"]}
    return {name: group_of[id(param)] for name, param in model.named_parameters()}, optimizer


def official_by_ours(oracle, finetuning):
    """`{our name: [official entries]}` (the official q and v biases both land on our qkv bias)."""
    mapped = {}
    for official_name, entry in oracle["params"].items():
        mapped.setdefault(our_name(official_name, finetuning), []).append(entry)
    return mapped


def assert_adamw_like_official(optimizer, oracle):
    defaults = oracle["optimizer"]["defaults"]
    assert type(optimizer).__name__ == "AdamW"
    for group in optimizer.param_groups:
        assert tuple(group["betas"]) == tuple(defaults["betas"]) and group["eps"] == defaults["eps"]


# ---------------------------------------------------------------------------------------------- pretraining
@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretraining_weight_decay_equals_official(official_recipe_dir, official_fixtures_dir, backbone, tmp_path):
    oracle = load_oracle(official_recipe_dir, "pretrain", backbone)
    model = convert_official_checkpoint(official_checkpoint(official_fixtures_dir, backbone))
    groups, optimizer = built_optimizer(SimMIMTrainer, model, tmp_path, oracle)
    expected = official_by_ours(oracle, finetuning=False)
    assert set(expected) == set(groups)  # every official parameter is one of ours and every one of ours official
    for name, entries in expected.items():
        for entry in entries:
            assert groups[name]["weight_decay"] == entry["weight_decay"], name
    assert_adamw_like_official(optimizer, oracle)


@pytest.mark.parametrize("backbone", ("vit", "swin"))  # the SwinV2 oracle has no probe
def test_pretraining_absolute_position_embedding_probe(official_recipe_dir, official_fixtures_dir, backbone):
    oracle = load_oracle(official_recipe_dir, "pretrain", backbone)
    probe = oracle["probe_with_abs_pos_embed"]
    config = convert_official_checkpoint(str(official_fixtures_dir / backbone / "checkpoint.pth")).config
    config.use_absolute_position_embeddings = True
    model = SimMIMForMaskedImageModeling(config)
    skip = no_weight_decay_parameter_names(model)
    probed = [key for key in probe if key.startswith("encoder.")]
    assert probed
    for official_name in probed:
        name = our_name(official_name, finetuning=False)
        assert name in dict(model.named_parameters()), name
        assert (0.0 if name in skip else 0.05) == probe[official_name]["weight_decay"], name


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("backbone", BACKBONES)
def test_finetuning_groups_equal_official(official_recipe_dir, backbone, tmp_path):
    oracle = load_oracle(official_recipe_dir, "finetune", backbone)
    model = SimMIMForImageClassification(finetuning_config(oracle["fields_set"]))
    groups, optimizer = built_optimizer(
        SimMIMFineTuneTrainer, model, tmp_path, oracle, layer_decay=oracle["layer_decay"]
    )
    expected = official_by_ours(oracle, finetuning=True)
    assert set(expected) == set(groups)
    for name, entries in expected.items():
        group = groups[name]
        for entry in entries:
            assert (group["weight_decay"], group["layer_id"]) == (entry["weight_decay"], entry["layer_id"]), name
            assert math.isclose(group["lr_scale"], entry["lr_scale"], rel_tol=REL_TOL), name
            assert math.isclose(group["lr"], entry["lr"], rel_tol=REL_TOL), name  # BASE_LR 1.0: lr == lr_scale
    assert_adamw_like_official(optimizer, oracle)


# Models that hold the probed names the oracle classifiers lack (mask token, absolute position embedding, the ViT
# shared table and final norm); their layer ids and scales must follow the official functions too.
PROBE_VARIANTS = {
    "vit": dict(use_absolute_position_embeddings=True, use_shared_relative_position_bias=True, use_mean_pooling=False),
    "swin": dict(use_absolute_position_embeddings=True),
}


@pytest.mark.parametrize("backbone", ("vit", "swin"))  # the SwinV2 oracle has no probes (its layer ids are Swin's)
def test_finetuning_layer_id_probes_equal_official(official_recipe_dir, backbone):
    oracle = load_oracle(official_recipe_dir, "finetune", backbone)
    fields = oracle["fields_set"]
    models = (
        SimMIMForImageClassification(finetuning_config(fields)),
        SimMIMForMaskedImageModeling(finetuning_config(fields, **PROBE_VARIANTS[backbone])),
    )
    groups = {}
    for model in models:
        for group in layer_decay_parameter_groups(model, 1.0, layer_decay=oracle["layer_decay"]):
            groups.update(dict.fromkeys(group["names"], group))
    for official_name, probe in oracle["layer_id_probes"].items():
        name = our_name(official_name, finetuning=True)
        assert name in groups, f"no model holds {name} (official {official_name})"
        assert groups[name]["layer_id"] == probe["layer_id"], official_name
        assert math.isclose(groups[name]["lr_scale"], probe["lr_scale"], rel_tol=REL_TOL), official_name


# ---------------------------------------------------------------------------------------------- the opt-in
def test_opt_in_exempts_named_parameters_beyond_the_official_ones(official_recipe_dir, official_fixtures_dir, tmp_path):
    """`no_weight_decay_names` adds exemptions to the official ones (here the intended ones the official pretraining
    misses: Swin's relative position bias tables) and changes nothing else."""
    oracle = load_oracle(official_recipe_dir, "pretrain", "swin")
    model = convert_official_checkpoint(str(official_fixtures_dir / "swin" / "checkpoint.pth"))
    recipe = SimMIMRecipe(no_weight_decay_names="relative_position_bias_table, decoder.0.weight")
    groups, _ = built_optimizer(SimMIMTrainer, model, tmp_path, oracle, recipe=recipe)
    expected = official_by_ours(oracle, finetuning=False)
    opted_in = {name for name in groups if "relative_position_bias_table" in name} | {"decoder.0.weight"}
    assert len(opted_in) == 9
    for name, entries in expected.items():
        official = 0.0 if name in opted_in else entries[0]["weight_decay"]
        assert groups[name]["weight_decay"] == official, name
