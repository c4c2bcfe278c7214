"""Training recipes as data: one frozen, named `Recipe` per official SimMIM configuration (microsoft/SimMIM's ViT and
Swin, microsoft/Swin-Transformer's SwinV2), and the defaults a run takes when it names none (the official `config.py`
values). The scripts' argument defaults read their recipe values from here.

A recipe fills the run's arguments that the command line leaves unset (`recipe_defaults`): a flag given
explicitly always wins. Learning rates are per 512 images, scaled by the total batch (`lr = base x batch / 512`),
as the official code does. Epoch counts become fractions of the run (warmup 10 of 800 epochs = 0.0125), so a
shorter run keeps the recipe's shape.
"""

from dataclasses import dataclass

from ..data.augmentation import OFFICIAL_RAND_AUGMENT
from ..models.configuration_simmim import PRESETS

SOURCE = "microsoft/SimMIM@d3e29bc configs/"
# SimMIM's SwinV2 configurations live in microsoft/Swin-Transformer (same config.py defaults; its cosine schedule
# starts after warmup: `Recipe.warmup_prefix`).
SWINV2_SOURCE = "microsoft/Swin-Transformer@f82860b configs/simmim/"
STAGES = ("pretraining", "fine-tuning")


@dataclass(frozen=True)
class Recipe:
    """One official configuration: the model preset it trains (plus config overrides, e.g. the fine-tuning
    window), the schedule and the optimisation values. Learning rates are per 512 images. `warmup_prefix`: the cosine
    runs over the steps after warmup (microsoft/Swin-Transformer's `LR_SCHEDULER.WARMUP_PREFIX`, default True there;
    microsoft/SimMIM has no such option and runs it over the whole run)."""

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

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"Recipe {self.name!r}: stage={self.stage!r} must be one of {STAGES}.")

    def describe(self):
        return f"{self.name} ({self.source})"


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
PRESET_BASE_LEARNING_RATES = {"vit-tiny-test": 8e-3, "swin-tiny-test": 8e-3, "swinv2-tiny-test": 8e-3}
# Fine-tuning without --recipe: the values every official fine-tuning config shares (TRAIN, MODEL.DROP_PATH_RATE)
# and config.py's AUG and MODEL.LABEL_SMOOTHING, over 30 epochs with the configs' warmup of 20 of 100 epochs;
FINETUNING_DEFAULTS = {
    "num_train_epochs": 30.0, "warmup_steps": 0.2, "base_learning_rate": 1.25e-3, "warmup_learning_rate": 2.5e-7,
    "min_learning_rate": 2.5e-7, "drop_path_rate": 0.1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5, "label_smoothing": 0.1, "rand_augment": OFFICIAL_RAND_AUGMENT, "random_erasing": 0.25,
}
# and the official layer-wise decay of the backbone's base model (ViT-B 0.65, Swin-B after 100 pretraining epochs 0.9,
# SwinV2-B 0.75).
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9, "swinv2": 0.75}


def recipe_names(stage):
    return sorted(name for name, recipe in RECIPES.items() if recipe.stage == stage)


def get_recipe(name, stage):
    """The recipe called `name`, checked to be one for `stage`; a clear error lists the others."""
    recipe = RECIPES.get(name)
    if recipe is None or recipe.stage != stage:
        raise ValueError(f"--recipe {name!r} is not a {stage} recipe: use one of {', '.join(recipe_names(stage))}.")
    return recipe


def check_recipe_backbone(name, config):
    """Refuse a recipe written for another backbone than the model's (e.g. a Swin recipe for a ViT checkpoint)."""
    if not name:
        return
    backbone = PRESETS[RECIPES[name].preset]["backbone"]
    if backbone != config.backbone:
        stage = RECIPES[name].stage
        fitting = [n for n in recipe_names(stage) if PRESETS[RECIPES[n].preset]["backbone"] == config.backbone]
        raise ValueError(
            f"--recipe {name} is for a {backbone} model but the model is a {config.backbone}: choose one of "
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
    return defaults
