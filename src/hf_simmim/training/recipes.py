"""Training recipes as data: one frozen, named `Recipe` per official SimMIM configuration (microsoft/SimMIM's ViT and
Swin, microsoft/Swin-Transformer's SwinV2), the CNN recipes of SparK (keyu-tian/SparK: ResNet, ConvNeXt) and ConvNeXt
V2's FCMAE (facebookresearch/ConvNeXt-V2), and the defaults a run takes when it names none (the official `config.py`
values). The scripts' argument defaults read their recipe values from here.

A recipe fills the run's arguments that the command line leaves unset (`recipe_defaults`): a flag given
explicitly always wins. Learning rates are per 512 images, scaled by the total batch (`lr = base x batch / 512`),
as the official code does (SparK's and FCMAE's, per 256 images, are doubled here). Epoch counts become fractions of
the run (warmup 10 of 800 epochs = 0.0125), so a shorter run keeps the recipe's shape. What a run does differently
from a recipe's source is stated in the recipe (`departures`, shown with its name in the model card).
"""

from dataclasses import dataclass

from ..data.augmentation import OFFICIAL_RAND_AUGMENT
from ..models.configuration_simmim import PRESETS

SOURCE = "microsoft/SimMIM@d3e29bc configs/"
# SimMIM's SwinV2 configurations live in microsoft/Swin-Transformer (same config.py defaults; its cosine schedule
# starts after warmup: `Recipe.warmup_prefix`).
SWINV2_SOURCE = "microsoft/Swin-Transformer@f82860b configs/simmim/"
# The CNN recipes: command-line defaults of argparse / tap scripts (no configuration files), cited by file and line.
SPARK_SOURCE = "keyu-tian/SparK@a63e386 "
FCMAE_SOURCE = "facebookresearch/ConvNeXt-V2@2553895 "
STAGES = ("pretraining", "fine-tuning")


@dataclass(frozen=True)
class Recipe:
    """One official configuration: the model preset it trains (plus config overrides, e.g. the fine-tuning
    window), the schedule and the optimisation values. Learning rates are per 512 images. `warmup_prefix`: the cosine
    runs over the steps after warmup (microsoft/Swin-Transformer's `LR_SCHEDULER.WARMUP_PREFIX`, default True there;
    microsoft/SimMIM has no such option and runs it over the whole run; SparK and FCMAE run theirs after warmup).
    `adam_beta2`: AdamW's second beta (the SimMIM configs: 0.999; SparK ResNet and FCMAE: 0.95). `mixup` (fine-tuning,
    None: the SimMIM default 0.8). `departures`: what a run with this recipe does differently from its source."""

    name: str
    stage: str
    source: str
    preset: str
    epochs: int
    warmup_epochs: int
    base_learning_rate: float
    warmup_learning_rate: float
    min_learning_rate: float
    schedule: str = "cosine"
    milestone_epochs: tuple = ()
    gamma: float = 0.1
    weight_decay: float = 0.05
    max_grad_norm: float = 5.0
    drop_path_rate: float = 0.0
    layer_decay: float = 1.0
    config_overrides: str | None = None
    warmup_prefix: bool = False
    adam_beta2: float = 0.999
    mixup: float | None = None
    departures: tuple = ()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Recipe {self.name!r}: stage={self.stage!r} must be one of {STAGES}.")

    def describe(self):
        differs = f"; differs: {'; '.join(self.departures)}" if self.departures else ""
        return f"{self.name} ({self.source}{differs})"


def _pretraining(name, config, preset, epochs, base_lr, warmup_lr, min_lr=5e-6, source=SOURCE, **fields):
    return Recipe(name, "pretraining", source + config, preset, epochs, 10, base_lr, warmup_lr, min_lr, **fields)


def _finetuning(name, config, preset, layer_decay, drop_path_rate=0.1, source=SOURCE, **fields):
    return Recipe(
        name, "fine-tuning", source + config, preset, 100, 20, 1.25e-3, 2.5e-7, 2.5e-7,
        layer_decay=layer_decay, drop_path_rate=drop_path_rate, **fields,
    )


_MULTISTEP_800 = dict(schedule="multistep", milestone_epochs=(700,))
RECIPES = {
    recipe.name: recipe
    for recipe in (
        _pretraining(
            "simmim-vit-base-800ep", "vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml",
            "vit-base-patch16-224", 800, 1e-4, 5e-7, drop_path_rate=0.1, **_MULTISTEP_800,
        ),
        _pretraining(
            "simmim-swin-base-100ep", "swin_base__100ep/simmim_pretrain__swin_base__img192_window6__100ep.yaml",
            "swin-base-window6-192", 100, 2e-4, 1e-6, min_lr=1e-5,
        ),
        _pretraining(
            "simmim-swin-base-800ep", "swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml",
            "swin-base-window6-192", 800, 1e-4, 5e-7, **_MULTISTEP_800,
        ),
        _pretraining(
            "simmim-swin-large-800ep", "swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml",
            "swin-large-window12-192", 800, 1e-4, 5e-7, **_MULTISTEP_800,
        ),
        _finetuning(
            "simmim-finetune-vit-base", "vit_base__800ep/simmim_finetune__vit_base__img224__800ep.yaml",
            "vit-base-patch16-224", 0.65,
        ),
        _finetuning(
            "simmim-finetune-swin-base-100ep-img192",
            "swin_base__100ep/simmim_finetune__swin_base__img192_window6__100ep.yaml",
            "swin-base-window6-192", 0.9,
        ),
        _finetuning(
            "simmim-finetune-swin-base-100ep",
            "swin_base__100ep/simmim_finetune__swin_base__img224_window7__100ep.yaml",
            "swin-base-window6-192", 0.9, config_overrides="image_size=224,window_size=7",
        ),
        _finetuning(
            "simmim-finetune-swin-base-800ep",
            "swin_base__800ep/simmim_finetune__swin_base__img224_window7__800ep.yaml",
            "swin-base-window6-192", 0.8, config_overrides="image_size=224,window_size=7",
        ),
        _finetuning(
            "simmim-finetune-swin-large-800ep",
            "swin_large__800ep/simmim_finetune__swin_large__img224_window14__800ep.yaml",
            "swin-large-window12-192", 0.7, drop_path_rate=0.2, config_overrides="image_size=224,window_size=14",
        ),
        # The preset trains with the normalised target (NORM_TARGET 47), as the configuration.
        _pretraining(
            "simmim-swinv2-base-800ep", "simmim_pretrain__swinv2_base__img192_window12__800ep.yaml",
            "swinv2-base-window12-192", 800, 1e-4, 5e-7, source=SWINV2_SOURCE, drop_path_rate=0.1, **_MULTISTEP_800,
        ),
        # Loading the 192 px / window 12 checkpoint at 224 px / window 14 sets its pretrained_window_sizes to
        # [12, 12, 12, 6], the configuration's PRETRAINED_WINDOW_SIZES (see SimMIMConfig.from_dict).
        _finetuning(
            "simmim-finetune-swinv2-base-800ep", "simmim_finetune__swinv2_base__img224_window14__800ep.yaml",
            "swinv2-base-window12-192", 0.75, source=SWINV2_SOURCE, config_overrides="image_size=224,window_size=14",
            warmup_prefix=True,
        ),
    )
}

# SparK pretraining (pretrain/utils/arg_util.py defaults): base_lr 2e-4 per 256 (l. 38, 132), warmup 40 of 1600
# epochs (l. 41-42), weight decay 0.04 (l. 39), clipping 5 (l. 43; LAMB's max_grad_norm, pretrain/main.py l. 79), drop
# path `--dp` 0 (l. 37), which keeps each model's own (pretrain/models/__init__.py `pretrain_default_model_kwargs`:
# ResNet-50 0.05; ConvNeXt-T is not listed: none), Adam beta2 0.95 for ResNet, 0.999 for ConvNeXt (l. 123-129); the
# schedule (utils/lr_control.py l. 13-17) warms up from 0.005x the peak and ends at 0.001x it, its cosine after warmup.
_SPARK_PRETRAINING = dict(
    stage="pretraining", epochs=1600, warmup_epochs=40, base_learning_rate=4e-4, warmup_learning_rate=2e-6,
    min_learning_rate=4e-7, weight_decay=0.04, max_grad_norm=5.0, warmup_prefix=True,
)
_SPARK_DEPARTURES = (
    "AdamW for LAMB (pretrain/main.py l. 79, same betas)",
    "constant weight decay 0.04 for 0.04 -> 0.2 by cosine (arg_util.py l. 39-40, lr_control.py l. 19-20)",
)
CNN_RECIPES = (
    Recipe(
        "spark-resnet50-1600ep", source=SPARK_SOURCE + "pretrain/utils/arg_util.py", preset="resnet50-224",
        adam_beta2=0.95, drop_path_rate=0.05, departures=_SPARK_DEPARTURES, **_SPARK_PRETRAINING,
    ),
    Recipe(
        "spark-convnext-tiny-1600ep", source=SPARK_SOURCE + "pretrain/utils/arg_util.py", preset="convnext-tiny-224",
        adam_beta2=0.999, drop_path_rate=0.0,
        departures=_SPARK_DEPARTURES + ("SparK published ConvNeXt-S/B/L with these values, not -T",),
        **_SPARK_PRETRAINING,
    ),
    # main_pretrain.py: 800 epochs (l. 37), warmup 40 (l. 38), blr 1.5e-4 per 256 (l. 61, 166), min_lr 0 (l. 63),
    # weight decay 0.05 (l. 57), AdamW betas (0.9, 0.95) (l. 179), no clipping (engine_pretrain.py l. 48); utils.py
    # adjust_learning_rate (l. 531-537): warmup from 0, cosine after warmup; no drop path (models/fcmae.py).
    Recipe(
        "fcmae-convnextv2-tiny-800ep", "pretraining", FCMAE_SOURCE + "main_pretrain.py", "convnextv2-tiny-224", 800,
        40, 3e-4, 0.0, 0.0, weight_decay=0.05, max_grad_norm=0.0, warmup_prefix=True, adam_beta2=0.95,
        departures=(
            "SparK's hierarchical decoder for FCMAE's one ConvNeXt block at stride 32 (models/fcmae.py l. 53-68)",
            "the decoder's mask tokens exempt from weight decay (SparK) where FCMAE decays its one (l. 178)",
        ),
    ),
    # TRAINING.md l. 147-167 (ConvNeXt V2-T): blr 8e-4 per 256, 300 epochs, warmup 40, layer decay 0.9 ("single", the
    # preset's), weight decay 0.05, drop path 0.2, reprob 0.25, mixup 0.8, cutmix 1.0, smoothing 0.1 (the SimMIM
    # defaults too) at a batch of 32 x 32 GPUs = 1024; min_lr 1e-6 (main_finetune.py l. 69) absolute, so 5e-7 per 512
    # at that batch; no clipping (l. 60); warmup from 0, cosine after warmup (utils.py l. 531-537).
    Recipe(
        "fcmae-finetune-convnextv2-tiny", "fine-tuning", FCMAE_SOURCE + "TRAINING.md", "convnextv2-tiny-224", 300, 40,
        1.6e-3, 0.0, 5e-7, weight_decay=0.05, max_grad_norm=0.0, drop_path_rate=0.2, layer_decay=0.9,
        warmup_prefix=True,
        departures=("no EMA of the weights (--model_ema True)", "min_lr absolute, not scaled by each layer's decay"),
    ),
    # downstream_imagenet/arg.py l. 20 (resnet50): batch 2048, 300 epochs, warmup 5, base_lr 0.002 per 256 (l. 135),
    # layer decay 0.7, weight decay 0.02, mixup 0.1 (cutmix 1.0, smoothing 0.1: util.py l. 81-85), drop path 0.05;
    # no clipping (l. 48); schedule as pretraining (lr_decay.py l. 11-17).
    Recipe(
        "spark-finetune-resnet50", "fine-tuning", SPARK_SOURCE + "downstream_imagenet/arg.py", "resnet50-224", 300, 5,
        4e-3, 2e-5, 4e-6, weight_decay=0.02, max_grad_norm=0.0, drop_path_rate=0.05, layer_decay=0.7, mixup=0.1,
        warmup_prefix=True,
        departures=(
            "AdamW and cross-entropy for LAMB and binary cross-entropy (util.py l. 75, 87-89)",
            "RandAugment for AutoAugment v0 (data.py l. 39)",
            "no EMA of the weights (arg.py l. 20: 0.9999)",
        ),
    ),
)
RECIPES.update({recipe.name: recipe for recipe in CNN_RECIPES})

# Without --recipe, both stages: microsoft/SimMIM config.py's TRAIN.WEIGHT_DECAY and TRAIN.CLIP_GRAD.
OPTIMIZER_DEFAULTS = {"weight_decay": 0.05, "max_grad_norm": 5.0}
# Pretraining without --recipe: the shape of the 100-epoch cosine config (warmup 10 of 100 epochs, cosine to 1e-5)
# over 30 epochs, and the 800-epoch configs' step at 700 of 800 for --lr_schedule multistep.
PRETRAINING_DEFAULTS = {
    "num_train_epochs": 30.0, "warmup_steps": 0.1, "min_learning_rate": 1e-5, "lr_milestones": [0.875],
    "lr_decay_gamma": 0.1,
}
# ... and the schedule's official base / warmup-start learning rates (the 100-epoch cosine configs and the
# 800-epoch multistep configs), warmup for 10 of 800 epochs with multistep.
SCHEDULE_LEARNING_RATES = {"cosine": (2e-4, 1e-6), "multistep": (1e-4, 5e-7), "trainer": (2e-4, 1e-6)}
MULTISTEP_WARMUP_FRACTION = 10 / 800
# The tiny CPU presets are ~1000x smaller than ViT-B: at the paper's 2e-4 their loss barely moves in the
# one-minute default run (0.92 -> 0.87 in 300 steps), at 8e-3 it falls to ~0.72.
PRESET_BASE_LEARNING_RATES = {
    "vit-tiny-test": 8e-3, "swin-tiny-test": 8e-3, "swinv2-tiny-test": 8e-3, "resnet-tiny-test": 8e-3,
    "convnext-tiny-test": 8e-3, "convnextv2-tiny-test": 8e-3,
}
# Fine-tuning without --recipe: the values every official fine-tuning config shares (TRAIN, MODEL.DROP_PATH_RATE)
# and config.py's AUG and MODEL.LABEL_SMOOTHING, over 30 epochs with the configs' warmup of 20 of 100 epochs;
FINETUNING_DEFAULTS = {
    "num_train_epochs": 30.0, "warmup_steps": 0.2, "base_learning_rate": 1.25e-3, "warmup_learning_rate": 2.5e-7,
    "min_learning_rate": 2.5e-7, "drop_path_rate": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5, "label_smoothing": 0.1, "rand_augment": OFFICIAL_RAND_AUGMENT, "random_erasing": 0.25,
}
# and the official layer-wise decay of the backbone's base model (ViT-B 0.65, Swin-B after 100 pretraining epochs 0.9,
# SwinV2-B 0.75; SparK's ResNet-50 0.7, ConvNeXt V2-T's 0.9).
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9, "swinv2": 0.75, "resnet": 0.7, "convnext": 0.9}


def recipe_names(stage):
    return sorted(name for name, recipe in RECIPES.items() if recipe.stage == stage)


def get_recipe(name, stage):
    """The recipe called `name`, checked to be one for `stage`; a clear error lists the others."""
    recipe = RECIPES.get(name)
    if recipe is None or recipe.stage != stage:
        raise ValueError(f"--recipe {name!r} is not a {stage} recipe: use one of {', '.join(recipe_names(stage))}.")
    return recipe


def _architecture(fields):
    """The backbone, ConvNeXt V2 told from V1 ("convnextv2"): what a recipe is written for."""
    if fields["backbone"] == "convnext" and fields.get("convnext_version", 1) == 2:
        return "convnextv2"
    return fields["backbone"]


def check_recipe_backbone(name, config):
    """Refuse a recipe written for another backbone than the model's (e.g. a Swin recipe for a ViT checkpoint)."""
    if not name:
        return
    backbone = _architecture(PRESETS[RECIPES[name].preset])
    model = _architecture({"backbone": config.backbone, "convnext_version": getattr(config, "convnext_version", 1)})
    if backbone != model:
        stage = RECIPES[name].stage
        fitting = [n for n in recipe_names(stage) if _architecture(PRESETS[RECIPES[n].preset]) == model]
        raise ValueError(
            f"--recipe {name} is for a {backbone} model but the model is a {model}: choose one of "
            f"{', '.join(fitting) or 'no recipe (none exists for this backbone)'}, or drop --recipe."
        )


def recipe_defaults(recipe):
    """The argument defaults (by dataclass field name) that `recipe` sets for a run."""
    defaults = {
        "num_train_epochs": float(recipe.epochs),
        "warmup_steps": recipe.warmup_epochs / recipe.epochs,
        "base_learning_rate": recipe.base_learning_rate,
        "warmup_learning_rate": recipe.warmup_learning_rate,
        "min_learning_rate": recipe.min_learning_rate,
        "weight_decay": recipe.weight_decay,
        "max_grad_norm": recipe.max_grad_norm,
        "preset": recipe.preset,
        "config_overrides": recipe.config_overrides,
        "adam_beta2": recipe.adam_beta2,
        "warmup_prefix": recipe.warmup_prefix,
    }
    if recipe.stage == "pretraining":
        defaults.update(
            lr_schedule=recipe.schedule,
            lr_milestones=[epoch / recipe.epochs for epoch in recipe.milestone_epochs] or [0.875],
            lr_decay_gamma=recipe.gamma,
            config_overrides=f"drop_path_rate={recipe.drop_path_rate}",
        )
    else:
        defaults.update(layer_decay=recipe.layer_decay, drop_path_rate=recipe.drop_path_rate)
        if recipe.mixup is not None:
            defaults["mixup"] = recipe.mixup
    return defaults
