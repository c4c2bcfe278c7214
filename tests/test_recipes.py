"""The named recipes hold the values of the official configurations (`tests/fixtures/official_configs/`, copied
from microsoft/SimMIM and, for SwinV2, microsoft/Swin-Transformer; the CNN recipes: the argparse / tap defaults of
keyu-tian/SparK and facebookresearch/ConvNeXt-V2, checked by hand below), and a run that names one trains with
them."""

import ast
import math
from pathlib import Path

import pytest
import yaml

from hf_simmim import SimMIMConfig
from hf_simmim.training.arguments import parse_finetune_arguments, parse_run_arguments
from hf_simmim.training.finetuning import finetuning_recipe
from hf_simmim.training.recipes import (
    FINETUNING_DEFAULTS,
    OPTIMIZER_DEFAULTS,
    RECIPES,
    check_recipe_backbone,
    get_recipe,
)
from hf_simmim.training.runs import parse_config_overrides, apply_learning_rate, resolve_recipe_defaults
from hf_simmim.training.schedules import SimMIMLRLambda

OFFICIAL_CONFIGS = Path(__file__).parent / "fixtures" / "official_configs"
# The defaults of microsoft/SimMIM config.py that the YAML files leave unset.
OFFICIAL_DEFAULTS = {
    "MIN_LR": 5e-6,
    "WEIGHT_DECAY": 0.05,
    "CLIP_GRAD": 5.0,
    "LAYER_DECAY": 1.0,
    "LR_SCHEDULER": {"NAME": "cosine", "GAMMA": 0.1, "MULTISTEPS": []},
}


def _yacs_value(value):
    """yacs reads YAML strings such as '1e-4' (not a float in YAML 1.1) with `ast.literal_eval`, as here."""
    if isinstance(value, dict):
        return {key: _yacs_value(item) for key, item in value.items()}
    try:
        return ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        return value


# microsoft/Swin-Transformer config.py (the SwinV2 configurations) has the same defaults, plus these; microsoft/SimMIM's
# build_scheduler passes no warmup_prefix (timm's default, False).
SWIN_TRANSFORMER_DEFAULTS = {
    "WARMUP_PREFIX": True,
    "PRETRAINED_WINDOW_SIZES": [0, 0, 0, 0],
    "NORM_TARGET": {"ENABLE": False, "PATCH_SIZE": 47},
}


# The recipes written from a YAML configuration (the CNN ones come from scripts' defaults: see the tests below).
YAML_RECIPES = sorted(name for name, recipe in RECIPES.items() if recipe.source.startswith("microsoft/"))


def official(recipe):
    values = _yacs_value(yaml.safe_load((OFFICIAL_CONFIGS / Path(recipe.source).name).read_text()))
    train = {**OFFICIAL_DEFAULTS, **values["TRAIN"]}
    train["LR_SCHEDULER"] = {**OFFICIAL_DEFAULTS["LR_SCHEDULER"], **train["LR_SCHEDULER"]}
    swin_transformer = recipe.source.startswith("microsoft/Swin-Transformer@")
    train["LR_SCHEDULER"].setdefault("WARMUP_PREFIX", swin_transformer and SWIN_TRANSFORMER_DEFAULTS["WARMUP_PREFIX"])
    return values["MODEL"], values["DATA"], train


def test_runs_without_a_recipe_start_from_the_official_defaults():
    """microsoft/SimMIM config.py: TRAIN.WEIGHT_DECAY 0.05, CLIP_GRAD 5.0; AUG.MIXUP 0.8, CUTMIX 1.0, MIXUP_PROB 1.0,
    MIXUP_SWITCH_PROB 0.5, REPROB 0.25, AUTO_AUGMENT 'rand-m9-mstd0.5-inc1'; MODEL.LABEL_SMOOTHING 0.1; and what
    every fine-tuning configuration sets alike."""
    assert OPTIMIZER_DEFAULTS == {"weight_decay": 0.05, "max_grad_norm": 5.0}
    official_aug = dict(mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, random_erasing=0.25,
                        rand_augment="rand-m9-mstd0.5-inc1", label_smoothing=0.1)
    assert {key: FINETUNING_DEFAULTS[key] for key in official_aug} == official_aug
    for recipe in (RECIPES[name] for name in YAML_RECIPES if RECIPES[name].stage == "fine-tuning"):
        _, _, train = official(recipe)
        assert FINETUNING_DEFAULTS["base_learning_rate"] == train["BASE_LR"]
        assert FINETUNING_DEFAULTS["warmup_learning_rate"] == train["WARMUP_LR"]
        assert FINETUNING_DEFAULTS["min_learning_rate"] == train["MIN_LR"]
        assert FINETUNING_DEFAULTS["warmup_steps"] == train["WARMUP_EPOCHS"] / train["EPOCHS"]
    _, _, recipe_args, training_args, _ = parse_finetune_arguments(["--model_name_or_path", "ckpt"])
    assert (recipe_args.mixup, recipe_args.random_erasing, training_args.weight_decay) == (0.8, 0.25, 0.05)


def test_every_official_configuration_has_a_recipe():
    sources = {Path(RECIPES[name].source).name for name in YAML_RECIPES}
    assert sources == {path.name for path in OFFICIAL_CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", YAML_RECIPES)
def test_a_recipe_holds_the_values_of_its_official_configuration(name):
    recipe = RECIPES[name]
    model, data, train = official(recipe)
    assert recipe.stage == ("pretraining" if model["NAME"] == "simmim_pretrain" else "fine-tuning")
    assert (recipe.epochs, recipe.warmup_epochs) == (train["EPOCHS"], train["WARMUP_EPOCHS"])
    assert (recipe.base_learning_rate, recipe.warmup_learning_rate) == (train["BASE_LR"], train["WARMUP_LR"])
    assert (recipe.min_learning_rate, recipe.weight_decay) == (train["MIN_LR"], train["WEIGHT_DECAY"])
    assert (recipe.max_grad_norm, recipe.layer_decay) == (train["CLIP_GRAD"], train["LAYER_DECAY"])
    assert recipe.schedule == train["LR_SCHEDULER"]["NAME"] and recipe.gamma == train["LR_SCHEDULER"]["GAMMA"]
    assert list(recipe.milestone_epochs) == train["LR_SCHEDULER"]["MULTISTEPS"]
    if recipe.schedule == "cosine":  # where warmup_prefix changes the schedule
        assert recipe.warmup_prefix == train["LR_SCHEDULER"]["WARMUP_PREFIX"]
    assert recipe.drop_path_rate == model["DROP_PATH_RATE"]
    config = SimMIMConfig.from_preset(recipe.preset, **parse_config_overrides(recipe.config_overrides))
    assert config.image_size == data["IMG_SIZE"] and config.backbone == model["TYPE"]
    if recipe.stage == "pretraining":
        assert (config.mask_patch_size, config.mask_ratio) == (data["MASK_PATCH_SIZE"], data["MASK_RATIO"])
    if model["TYPE"] in ("swin", "swinv2"):
        swin = model[model["TYPE"].upper()]
        assert (config.embed_dim, config.depths, config.num_heads, config.window_size) == (
            swin["EMBED_DIM"], swin["DEPTHS"], swin["NUM_HEADS"], swin["WINDOW_SIZE"]
        )
    if model["TYPE"] == "swinv2":
        assert_swinv2_fields(recipe, model)
    if model["TYPE"] == "vit":
        vit = model["VIT"]
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
            vit["EMBED_DIM"], vit["DEPTH"], vit["NUM_HEADS"]
        )


def assert_swinv2_fields(recipe, model):
    """The normalised target of a pretraining configuration is the preset's; the pretrained windows of a fine-tuning
    one are what loading a checkpoint of the recipe's (pretraining) preset with its overrides gives, the path of
    `from_pretrained(checkpoint, **overrides)`."""
    norm_target = {**SWIN_TRANSFORMER_DEFAULTS["NORM_TARGET"], **model.get("SIMMIM", {}).get("NORM_TARGET", {})}
    windows = model["SWINV2"].get("PRETRAINED_WINDOW_SIZES", SWIN_TRANSFORMER_DEFAULTS["PRETRAINED_WINDOW_SIZES"])
    overrides = parse_config_overrides(recipe.config_overrides)
    config = SimMIMConfig.from_dict(SimMIMConfig.from_preset(recipe.preset).to_dict(), **overrides)
    assert config.pretrained_window_sizes == windows
    if recipe.stage == "pretraining":
        assert (config.norm_target, config.norm_target_patch_size) == (
            "local" if norm_target["ENABLE"] else None, norm_target["PATCH_SIZE"]
        )


def test_the_swinv2_fine_tuning_preset_is_what_loading_the_pretraining_one_at_its_size_gives():
    """`swinv2-base-window14-224` writes the official fine-tuning model by hand; a checkpoint of the pretraining preset
    loaded with the fine-tuning recipe's overrides becomes the same architecture."""
    recipe = RECIPES["simmim-finetune-swinv2-base-800ep"]
    loaded = SimMIMConfig.from_dict(
        SimMIMConfig.from_preset(recipe.preset).to_dict(), **parse_config_overrides(recipe.config_overrides)
    )
    written = SimMIMConfig.from_preset("swinv2-base-window14-224")
    fields = ("image_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size", "pretrained_window_sizes")
    assert {f: getattr(loaded, f) for f in fields} == {f: getattr(written, f) for f in fields}


def test_the_swinv2_fine_tuning_cosine_starts_after_warmup():
    """microsoft/Swin-Transformer runs the fine-tuning cosine over the steps after warmup (timm's warmup_prefix=True:
    t_initial = steps - warmup, t - warmup); microsoft/SimMIM over the whole run. 100 steps, 20 of warmup from 0."""
    prefixed = SimMIMLRLambda(1.0, 100, 20, 0.0, 0.1, warmup_prefix=True)
    whole_run = SimMIMLRLambda(1.0, 100, 20, 0.0, 0.1)
    assert prefixed.lr_at(10) == whole_run.lr_at(10) == pytest.approx(0.5)  # warmup alike
    assert prefixed.lr_at(20) == pytest.approx(1.0)  # the peak right after warmup
    assert whole_run.lr_at(20) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert prefixed.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 80 cosine steps
    assert prefixed.lr_at(100) == whole_run.lr_at(100) == pytest.approx(0.1)
    assert RECIPES["simmim-finetune-swinv2-base-800ep"].warmup_prefix
    assert not RECIPES["simmim-finetune-swin-base-800ep"].warmup_prefix


def test_the_swinv2_recipes_reach_the_runs():
    model_args, _, recipe_args, training_args, given = parse_finetune_arguments(
        ["--recipe", "simmim-finetune-swinv2-base-800ep", "--model_name_or_path", "ckpt"]
    )
    assert (model_args.layer_decay, model_args.drop_path_rate) == (0.75, 0.1)
    # the cosine after warmup of Swin-Transformer's fine-tuning reaches the schedule the trainer builds
    assert finetuning_recipe(training_args, recipe_args, given).warmup_prefix
    assert model_args.config_overrides == "image_size=224,window_size=14"
    model_args, _, recipe_args, training_args, _ = parse_run_arguments(["--recipe", "simmim-swinv2-base-800ep"])
    assert model_args.preset == "swinv2-base-window12-192" and training_args.num_train_epochs == 800
    assert recipe_args.lr_schedule == "multistep" and recipe_args.base_learning_rate == 1e-4
    swin = SimMIMConfig.from_preset("swin-tiny-test")
    with pytest.raises(ValueError, match="is for a swinv2 model but the model is a swin"):
        check_recipe_backbone("simmim-finetune-swinv2-base-800ep", swin)


def test_a_pretraining_run_naming_a_recipe_trains_with_it():
    argv = ["--recipe", "simmim-swin-base-800ep", "--per_device_train_batch_size", "128", "--output_dir", "x"]
    model_args, _, recipe_args, training_args, given = parse_run_arguments(argv)
    assert model_args.preset == "swin-base-window6-192" and training_args.num_train_epochs == 800
    recipe, _ = apply_learning_rate(training_args, recipe_args, given)
    # 1e-4 per 512 images at a batch of 128; warmup 10 of 800 epochs; x0.1 at epoch 700 of 800
    assert training_args.learning_rate == pytest.approx(1e-4 * 128 / 512)
    assert training_args.warmup_steps == pytest.approx(10 / 800)
    assert recipe.schedule == "multistep" and list(recipe.milestones) == [700 / 800]


def test_flags_win_over_the_recipe_and_a_named_model_over_its_preset():
    argv = ["--recipe", "simmim-vit-base-800ep", "--num_train_epochs", "3", "--model_name_or_path", "ckpt"]
    model_args, _, recipe_args, training_args, _ = parse_run_arguments(argv)
    assert training_args.num_train_epochs == 3 and recipe_args.base_learning_rate == 1e-4
    assert model_args.preset is None and model_args.model_name_or_path == "ckpt"
    model_args, _, _, training_args, _ = parse_finetune_arguments(
        ["--recipe", "simmim-finetune-swin-large-800ep", "--model_name_or_path", "ckpt"]
    )
    assert (model_args.layer_decay, model_args.drop_path_rate) == (0.7, 0.2)
    assert model_args.config_overrides == "image_size=224,window_size=14"


def test_a_recipe_of_the_other_stage_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="not a pretraining recipe: use one of fcmae-convnextv2-tiny-800ep, simmim-swin-base-100ep"):
        parse_run_arguments(["--recipe", "simmim-finetune-vit-base"])
    with pytest.raises(ValueError, match="not a fine-tuning recipe"):
        get_recipe("simmim-vit-base-800ep", "fine-tuning")


def test_no_weight_decay_names_reach_the_optimizer_of_a_run(tmp_path):
    """The official pretraining decays the ViT mask token and shared relative position table; a run may exempt them
    by name (`--no_weight_decay_names`), and nothing else changes."""
    from hf_simmim import SimMIMForMaskedImageModeling
    from hf_simmim.training.trainer import SimMIMTrainer

    def decayed_names(argv):
        argv = argv + ["--output_dir", str(tmp_path), "--eval_strategy", "no"]
        model_args, _, recipe_args, training_args, given = parse_run_arguments(argv)
        resolve_recipe_defaults(recipe_args, model_args)
        recipe, _ = apply_learning_rate(training_args, recipe_args, given)
        model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-tiny-test"))
        return set(SimMIMTrainer(model=model, args=training_args, recipe=recipe).get_decay_parameter_names(model))

    official = decayed_names([])
    assert {"simmim.encoder.mask_token", "simmim.encoder.rel_pos_bias.relative_position_bias_table"} <= official
    exempted = decayed_names(["--no_weight_decay_names", "mask_token,relative_position_bias_table"])
    assert official - exempted == {"simmim.encoder.mask_token", "simmim.encoder.rel_pos_bias.relative_position_bias_table"}


def test_a_users_config_overrides_add_to_the_recipes():
    model_args, *_ = parse_finetune_arguments(
        ["--recipe", "simmim-finetune-swin-base-100ep", "--model_name_or_path", "ckpt", "--config_overrides", "mask_ratio=0.5,window_size=12"]
    )
    # the recipe's image size stays; the user's window wins over the recipe's 7
    assert parse_config_overrides(model_args.config_overrides) == {"image_size": 224, "window_size": 12, "mask_ratio": 0.5}


def test_a_recipe_for_another_backbone_is_refused_naming_the_fitting_ones():
    vit = SimMIMConfig.from_preset("vit-tiny-test")
    with pytest.raises(ValueError, match="is for a swin model but the model is a vit: choose one of simmim-finetune-vit-base"):
        check_recipe_backbone("simmim-finetune-swin-base-100ep", vit)
    check_recipe_backbone("simmim-finetune-vit-base", vit)  # fits: no error


def test_a_from_scratch_baseline_keeps_no_layer_decay_under_a_recipe():
    argv = ["--recipe", "simmim-finetune-swin-base-800ep", "--model_name_or_path", "ckpt", "--from_scratch"]
    model_args, *_ = parse_finetune_arguments(argv)
    assert model_args.layer_decay is None  # resolved to 1.0 for a from-scratch run
    model_args, *_ = parse_finetune_arguments(argv + ["--layer_decay", "0.8"])
    assert model_args.layer_decay == 0.8


def test_the_model_card_names_what_the_optimizer_did_not_decay(tmp_path):
    """Swin: the official pretraining decays the relative position tables and exempts the mask token; its
    fine-tuning exempts the tables (the keyword matches there)."""
    from transformers import TrainingArguments

    from hf_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling
    from hf_simmim.reporting.model_card import describe_weight_decay
    from hf_simmim.training.schedules import SimMIMRecipe
    from hf_simmim.training.trainer import SimMIMTrainer

    config = SimMIMConfig.from_preset("swin-tiny-test")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)

    def rule(model, names=()):
        trainer = SimMIMTrainer(model=model, args=args, recipe=SimMIMRecipe(no_weight_decay_names=names))
        return describe_weight_decay(trainer, model)

    assert rule(SimMIMForMaskedImageModeling(config)).endswith("biases, mask_token (as the official code)")
    classifier = SimMIMForImageClassification(config)
    assert rule(classifier).endswith("biases, relative_position_bias_table (as the official code)")
    assert rule(classifier, ("classifier",)).endswith(
        "classifier.weight, relative_position_bias_table (--no_weight_decay_names classifier)"
    )


# ---------------------------------------------------------------------------------------------- CNN recipes
# By hand from the sources (no configuration file exists: argparse / tap defaults and TRAINING.md commands), at the
# commits the recipes name. Learning rates there are per 256 images, here per 512: doubled.
SPARK_PRETRAINING = dict(  # keyu-tian/SparK pretrain/utils/arg_util.py
    epochs=1600,  # l. 41 ep
    warmup_epochs=40,  # l. 42 wp_ep
    base_learning_rate=2 * 2e-4,  # l. 38 base_lr, l. 132 lr = base_lr * glb_batch_size / 256
    warmup_learning_rate=0.005 * 2 * 2e-4,  # utils/lr_control.py l. 14: warmup from 0.005 x peak
    min_learning_rate=0.001 * 2 * 2e-4,  # utils/lr_control.py l. 17: cosine to 0.001 x peak, after warmup (l. 16)
    weight_decay=0.04,  # l. 39 wd (its cosine to wde 0.2, l. 40, is a stated departure)
    max_grad_norm=5.0,  # l. 43 clip; pretrain/main.py l. 79 LAMB max_grad_norm=5.0
    warmup_prefix=True,
)
# l. 37 dp 0 keeps the model's own drop path: pretrain/models/__init__.py pretrain_default_model_kwargs, resnet50 0.05;
# convnext_tiny is not listed (convnext_small 0.2): none
CNN_RECIPE_VALUES = {
    "spark-resnet50-1600ep": dict(SPARK_PRETRAINING, adam_beta2=0.95, drop_path_rate=0.05),  # l. 124: ada 0.95
    "spark-convnext-tiny-1600ep": dict(SPARK_PRETRAINING, adam_beta2=0.999, drop_path_rate=0.0),  # l. 128: 0.999
    "fcmae-convnextv2-tiny-800ep": dict(  # facebookresearch/ConvNeXt-V2 main_pretrain.py
        epochs=800,  # l. 37
        warmup_epochs=40,  # l. 38
        base_learning_rate=2 * 1.5e-4,  # l. 61 blr, l. 166 lr = blr * eff_batch_size / 256
        warmup_learning_rate=0.0,  # utils.py l. 534: lr * epoch / warmup_epochs
        min_learning_rate=0.0,  # l. 63 min_lr
        weight_decay=0.05,  # l. 57
        max_grad_norm=0.0,  # engine_pretrain.py l. 48: loss_scaler without clip_grad
        adam_beta2=0.95,  # l. 179 betas=(0.9, 0.95)
        drop_path_rate=0.0,  # models/fcmae.py: SparseConvNeXtV2 built without drop path
        warmup_prefix=True,  # utils.py l. 536-537: cosine over (epoch - warmup) / (epochs - warmup)
    ),
    "fcmae-finetune-convnextv2-tiny": dict(  # TRAINING.md l. 147-167 (ConvNeXt V2-T, 4 nodes x 8 GPUs x 32)
        epochs=300, warmup_epochs=40, base_learning_rate=2 * 8e-4, weight_decay=0.05, drop_path_rate=0.2,
        layer_decay=0.9,
        warmup_learning_rate=0.0,  # utils.py l. 534
        min_learning_rate=1e-6 / (1024 / 512),  # main_finetune.py l. 69: 1e-6, absolute, at a batch of 1024
        max_grad_norm=0.0,  # main_finetune.py l. 60 clip_grad None
        adam_beta2=0.999,  # main_finetune.py l. 80 opt_betas None: AdamW's default
        warmup_prefix=True,
    ),
    "spark-finetune-resnet50": dict(  # keyu-tian/SparK downstream_imagenet/arg.py l. 20 (resnet50)
        epochs=300, warmup_epochs=5, base_learning_rate=2 * 0.002, layer_decay=0.7, weight_decay=0.02, mixup=0.1,
        warmup_learning_rate=0.005 * 2 * 0.002,  # lr_decay.py l. 14
        min_learning_rate=0.001 * 2 * 0.002,  # lr_decay.py l. 17
        max_grad_norm=0.0,  # arg.py l. 48: clip -1
        drop_path_rate=0.05,  # arg.py l. 20 dp
        warmup_prefix=True,
    ),
}
CNN_PRESETS = {
    "spark-resnet50-1600ep": "resnet50-224",
    "spark-convnext-tiny-1600ep": "convnext-tiny-224",
    "fcmae-convnextv2-tiny-800ep": "convnextv2-tiny-224",
    "fcmae-finetune-convnextv2-tiny": "convnextv2-tiny-224",
    "spark-finetune-resnet50": "resnet50-224",
}


def test_every_cnn_recipe_is_checked_by_hand():
    assert set(CNN_RECIPE_VALUES) == set(RECIPES) - set(YAML_RECIPES)


@pytest.mark.parametrize("name", sorted(CNN_RECIPE_VALUES))
def test_a_cnn_recipe_holds_the_values_of_its_source(name):
    recipe = RECIPES[name]
    values = {field: getattr(recipe, field) for field in CNN_RECIPE_VALUES[name]}
    assert values == pytest.approx(CNN_RECIPE_VALUES[name])
    assert recipe.preset == CNN_PRESETS[name] and recipe.departures
    assert recipe.source.startswith(("keyu-tian/SparK@a63e386 ", "facebookresearch/ConvNeXt-V2@2553895 "))


@pytest.mark.parametrize("preset", ["resnet50-224", "convnext-tiny-224", "convnextv2-tiny-224"])
def test_the_cnn_presets_pretrain_as_spark_and_fcmae(preset):
    """SparK (pretrain/spark.py l. 113-120) and FCMAE (models/fcmae.py l. 164-184, norm_pix_loss on, main_pretrain.py
    l. 50-52): mask ratio 0.6 of 32 px squares, L2 on each square standardised, the loss on masked squares only."""
    config = SimMIMConfig.from_preset(preset)
    assert (config.image_size, config.mask_patch_size, config.mask_ratio) == (224, 32, 0.6)
    assert (config.loss_type, config.norm_target, config.encoder_stride) == ("l2", "mask_patch", 32)
    assert (config.conv_masking, config.decoder_type, config.decoder_hidden_size) == ("sparse", "hierarchical", 768)


def test_the_cnn_recipes_reach_the_runs():
    model_args, _, recipe_args, training_args, given = parse_run_arguments(
        ["--recipe", "fcmae-convnextv2-tiny-800ep", "--per_device_train_batch_size", "256", "--output_dir", "x"]
    )
    assert model_args.preset == "convnextv2-tiny-224" and training_args.num_train_epochs == 800
    assert (training_args.adam_beta2, training_args.weight_decay, training_args.max_grad_norm) == (0.95, 0.05, 0.0)
    recipe, _ = apply_learning_rate(training_args, recipe_args, given)
    assert training_args.learning_rate == pytest.approx(1.5e-4 * 256 / 256)  # blr x batch / 256
    assert training_args.warmup_steps == pytest.approx(40 / 800) and recipe.warmup_lr == 0.0
    model_args, _, recipe_args, training_args, _ = parse_finetune_arguments(
        ["--recipe", "spark-finetune-resnet50", "--model_name_or_path", "ckpt"]
    )
    assert (model_args.layer_decay, recipe_args.mixup, recipe_args.cutmix, training_args.weight_decay) == (
        0.7, 0.1, 1.0, 0.02
    )


def test_a_convnext_v1_recipe_is_refused_for_a_v2_model():
    v2 = SimMIMConfig.from_preset("convnextv2-tiny-test")
    with pytest.raises(ValueError, match="is for a convnext model but the model is a convnextv2: choose one of fcmae"):
        check_recipe_backbone("spark-convnext-tiny-1600ep", v2)
    check_recipe_backbone("fcmae-convnextv2-tiny-800ep", v2)
    with pytest.raises(ValueError, match="is for a resnet model but the model is a convnextv2"):
        check_recipe_backbone("spark-finetune-resnet50", v2)


def test_a_cnn_recipe_names_what_the_runs_do_differently():
    described = RECIPES["spark-resnet50-1600ep"].describe()
    assert described.startswith("spark-resnet50-1600ep (keyu-tian/SparK@a63e386 pretrain/utils/arg_util.py; differs:")
    assert "AdamW for LAMB" in described and "0.04 -> 0.2" in described
