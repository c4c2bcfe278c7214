"""The command-line arguments of `examples/run_mim.py` and `examples/run_finetune.py` (model, data, recipe, and
`transformers.TrainingArguments` with SimMIM defaults), parsed with `HfArgumentParser`.

SimMIM defaults replace `TrainingArguments`' own where the recipe differs (weight decay 0.05, clipping 5.0,
warmup 10% of the run (10/800 with the multistep schedule), bf16 where the GPU has it, evaluation and pictures 4
times a run); any flag given on the command line wins. The footguns of transformers' `run_mim.py` are fixed
here, not left to the user: `remove_unused_columns=False` (the image column must reach the transform),
`label_names=["bool_masked_pos"]` (otherwise no eval loss), and `use_cpu=True` on a machine without an
accelerator (otherwise `accelerate launch --multi_gpu` there runs independent, non-distributed copies).
"""

import argparse
import difflib
import json
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from ..data.augmentation import parse_rand_augment
from ..models.configuration_simmim import PRESETS
from ..models.masking import MASK_STRATEGIES
from .recipes import (
    FINETUNING_DEFAULTS,
    OPTIMIZER_DEFAULTS,
    PRETRAINING_DEFAULTS,
    get_recipe,
    recipe_defaults,
    recipe_names,
)
from .schedules import SCHEDULES

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "vit-tiny-test"
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "simmim-pretraining")
FINETUNE_OUTPUT_DIR = os.path.join("outputs", "simmim-finetuning")
MODES = ("finetune", "linear_probe", "knn")
# --model_type as transformers' run_mim.py means it (a model of that type from scratch): the paper's base model of
# the backbone. "simmim" names the model type of every SimMIM config, whatever its backbone.
MODEL_TYPE_PRESETS = {
    "vit": "vit-base-patch16-224", "swin": "swin-base-window6-192", "swinv2": "swinv2-base-window12-192",
    "resnet": "resnet50-224", "convnext": "convnext-tiny-224",
}
MODEL_TYPES = ("simmim", *MODEL_TYPE_PRESETS)
TRAIN_VAL_SPLIT_HELP = (
    "transformers' name for the held-out share, as a fraction: 0.15 = --validation_split_percentage 15. Give one "
    "of the two."
)


@dataclass
class ModelArguments:
    """Which model to pretrain: a preset, a `SimMIMConfig` JSON file, or an existing checkpoint (continue
    pretraining). Nothing given: the tiny preset `vit-tiny-test`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SimMIM checkpoint (folder or hub id) to continue pretraining."}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"A SimMIMConfig preset: {', '.join(sorted(PRESETS))}. Unset: the --recipe's, else "
                  f"{DEFAULT_PRESET} when no other model is named."},
    )
    config_file: str | None = field(default=None, metadata={"help": "A SimMIMConfig JSON file (config.json)."})
    model_type: str | None = field(
        default=None,
        metadata={"help": "As in transformers' run_mim.py, a model of this type from scratch: vit or swin builds the "
                  f"paper's base model ({', '.join(MODEL_TYPE_PRESETS.values())}); simmim names any SimMIM "
                  "model. With a preset, config file or checkpoint it must name that model's backbone."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to override, e.g. 'mask_ratio=0.5,drop_path_rate=0.0' (JSON values)."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Input resolution. Unset: the model's. A checkpoint continues at another size with its "
                  "position tables interpolated."},
    )
    patch_size: int | None = field(
        default=None,
        metadata={"help": "Encoder patch size. Unset: the model's; a checkpoint's is fixed by its weights."},
    )
    mask_patch_size: int | None = field(
        default=None, metadata={"help": "Side of each masked square in pixels (official 32). Unset: the model's."}
    )
    mask_ratio: float | None = field(
        default=None, metadata={"help": "Share of the squares masked (official 0.6). Unset: the model's."}
    )
    mask_strategy: str | None = field(
        default=None,
        metadata={"help": f"How masks are drawn: {', '.join(MASK_STRATEGIES)} (official random_block; grid needs "
                  "--mask_ratio 0.5; user: each image's mask from --mask_column, which sets it). Unset: the model's.",
                  "choices": list(MASK_STRATEGIES)},
    )
    num_channels: int | None = field(
        default=None,
        metadata={"help": "Channels of the images, for a new model: 3 converts photos to RGB; any other count keeps "
                  "each image's own channels at full precision (1 for grayscale or 16-bit images, N for .npy or "
                  "multi-band arrays). Unset: the model's (3 for the presets); a checkpoint's is fixed."},
    )
    image_mean: list[float] | None = field(
        default=None,
        metadata={"help": "Per-channel mean of the images, after scaling to [0, 1] for 8- and 16-bit pixels "
                  "(with --image_std). Unset: --image_processor_name's, else the checkpoint's, else ImageNet's for "
                  "RGB photos, else computed from the training images (hf-simmim stats DATA prints them)."},
    )
    image_std: list[float] | None = field(
        default=None, metadata={"help": "Per-channel standard deviation of the images (with --image_mean)."}
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Folder or hub id of the image processor whose normalisation to use (sizes and masks "
                  "follow the model). Unset: the checkpoint's, else ImageNet's mean and std."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})
    model_revision: str = field(
        default="main", metadata={"help": "Revision (branch, tag or commit) of a hub checkpoint and processor."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hugging Face token for private hub checkpoints and datasets. Unset: the one saved by "
                  "`hf auth login`."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Accepted as in transformers' scripts; changes nothing here: the model is built from the "
                  "installed hf_simmim classes and datasets runs no loading scripts."},
    )


@dataclass
class DataArguments:
    """Which images: a hub dataset, a local folder of images, Parquet/Arrow files, or (nothing given) the sample
    bundled with the package."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the hub, or a local folder / Parquet / Arrow path."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Training images: a folder of images (imagefolder) or Parquet/Arrow file(s)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, same kinds as train_dir."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "The column holding images (default: detected)."}
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percentage of train held out for validation when the data has no validation split."},
    )
    train_val_split: float | None = field(default=None, metadata={"help": TRAIN_VAL_SPLIT_HELP})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the training images as a stream (datasets' IterableDataset: Parquet/Arrow or WebDataset "
                  ".tar shards, a folder, or a hub dataset as it downloads) instead of loading them first: split "
                  "across processes by shard, shuffled with a buffer, reshuffled every epoch, resumed exactly. Needs "
                  "--max_steps; validation images (a validation split or --validation_dir) are read once, at start."},
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={"help": "--streaming: examples each DataLoader worker holds (undecoded) to shuffle the stream."},
    )
    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Validation images drawn in the reconstruction picture (0: no picture)."}
    )
    eval_mask_seed: int = field(default=0, metadata={"help": "Seed of the fixed evaluation masks and pictures."})
    mask_column: str | None = field(
        default=None,
        metadata={"help": "A column of user masks, one per image (a mask image or HW array of the image's size, "
                  "nonzero = masked), cropped and flipped with the image; a patch is masked when at least half of "
                  "its pixels are. Sets --mask_strategy user."},
    )
    augmentation_device: str = field(
        default="auto",
        metadata={"help": "Where the training crop and flip run. cpu: DataLoader workers crop each image. "
                  "accelerator: workers only decode (uint8, whole image) and draw each image's crop box and flip, "
                  "the same draws as the CPU path; the batch is cropped, resized (PIL's bilinear, within one grey "
                  "level) and flipped on the device the model trains on. Needs training images all of one size "
                  "(e.g. CIFAR), RGB, not streamed, without --mask_column. auto: accelerator when the model trains "
                  "on an accelerator and the images qualify and are at most twice the model's size (the CPU path "
                  "would decode them in full too), else cpu.",
                  "choices": ["cpu", "accelerator", "auto"]},
    )
    display_channels: list[int] | None = field(
        default=None,
        metadata={"help": "The channels the reconstruction pictures show as red, green and blue (one index: as "
                  "grey). Unset: RGB as it is, one channel as grey, else the first three."},
    )


@dataclass
class RecipeArguments:
    """The SimMIM recipe beyond `TrainingArguments`."""

    recipe: str | None = field(
        default=None,
        metadata={"help": f"A named official pretraining recipe ({', '.join(recipe_names('pretraining'))}): its "
                  "model preset, epochs, schedule and learning rates become the defaults (flags still win)."},
    )
    base_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "lr = base_learning_rate * total batch / 512 (ignored if --learning_rate is given). Default: "
            "2e-4 (cosine) or 1e-4 (multistep) as the paper's configs; 8e-3 for the tiny *-test presets."
        },
    )
    warmup_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate the warmup starts from, scaled like the base learning rate. Default: 1e-6 "
            "(cosine) or 5e-7 (multistep)."
        },
    )
    min_learning_rate: float = field(
        default=PRETRAINING_DEFAULTS["min_learning_rate"],
        metadata={"help": "Learning rate the cosine ends at (scaled like the base learning rate)."},
    )
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine (100-epoch configs), multistep (800-epoch configs), or trainer (--lr_scheduler_type)."
        },
    )
    lr_milestones: list[float] = field(
        default_factory=lambda: list(PRETRAINING_DEFAULTS["lr_milestones"]),
        metadata={"help": "multistep: where the learning rate drops, as fractions of the run (700/800) or steps."},
    )
    lr_decay_gamma: float = field(
        default=PRETRAINING_DEFAULTS["lr_decay_gamma"], metadata={"help": "multistep: the factor at each milestone."}
    )
    warmup_prefix: bool = field(
        default=False,
        metadata={"help": "cosine: decay over the steps after warmup (microsoft/Swin-Transformer's SwinV2 recipes) "
                  "instead of over the whole run (microsoft/SimMIM's)."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a previous run in --output_dir (the default output dir always is)."}
    )
    stop_on_nonfinite_loss: bool = field(default=True, metadata={"help": "Stop at a NaN/inf loss, naming the step."})
    model_card_license: str = field(default="apache-2.0", metadata={"help": "License in the model card metadata."})
    no_weight_decay_names: str = field(
        default="",
        metadata={"help": "Comma-separated substrings of parameter names also exempt from weight decay, beyond the "
                  "official code's (e.g. 'relative_position_bias_table,mask_token'). Unset: only the official ones."},
    )


@dataclass
class FineTuneModelArguments:
    """The encoder to evaluate: a SimMIM checkpoint (ours, or converted from microsoft/SimMIM or transformers),
    or, with --from_scratch, the same architecture with fresh weights (the baseline pretraining must beat)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SimMIM checkpoint (output of run_mim.py, a converted one, or a hub id)."}
    )
    preset: str | None = field(default=None, metadata={"help": "With --from_scratch and no checkpoint: a preset."})
    from_scratch: bool = field(
        default=False, metadata={"help": "Same architecture, randomly initialised (the from-scratch baseline)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields to change, e.g. 'window_size=7,image_size=224' (tables are interpolated)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise the checkpoint's weights whose shape the config changes (e.g. a classifier "
                  "head for another number of classes) instead of refusing them; position tables are interpolated "
                  "in any case."},
    )
    mode: str = field(default="finetune", metadata={"help": f"One of {MODES}."})
    drop_path_rate: float = field(
        default=FINETUNING_DEFAULTS["drop_path_rate"], metadata={"help": "Stochastic depth while fine-tuning."}
    )
    per_block_relative_position_bias: bool = field(
        default=True,
        metadata={
            "help": "ViT with a shared relative position table: give each block its own table, started from the "
            "shared one (the official fine-tuning), so layer-wise decay applies to it per block."
        },
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise lr decay (default: 0.65 ViT, 0.9 Swin, 0.75 SwinV2, 0.7 ResNet (SparK), 0.9 ConvNeXt, as "
            "the official configs; 1.0, i.e. none, "
            "with --from_scratch, so the baseline's lower layers train at the full rate)."
        },
    )
    probe_block: int | None = field(
        default=None, metadata={"help": "linear_probe / knn: features after this many blocks (ViT) or stages (Swin, ResNet, "
                  "ConvNeXt); default the last."}
    )
    knn_k: int = field(default=20, metadata={"help": "knn: neighbours that vote."})
    knn_temperature: float = field(default=0.07, metadata={"help": "knn: vote weight exp(similarity / T)."})
    probe_epochs: int = field(default=100, metadata={"help": "linear_probe: epochs over the frozen features."})
    probe_learning_rate: float = field(default=1e-2, metadata={"help": "linear_probe: AdamW learning rate."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})


@dataclass
class FineTuneDataArguments:
    """Labelled images: a hub dataset, a local folder of class subfolders, Parquet/Arrow files, or (nothing given)
    the CIFAR-10 sample bundled with the package."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the hub, or a local path."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images: image folder or Parquet/Arrow."})
    validation_dir: str | None = field(default=None, metadata={"help": "Evaluation images, same kinds."})
    image_column_name: str | None = field(default=None, metadata={"help": "Column of images (default: detected)."})
    label_column_name: str = field(default="label", metadata={"help": "Column of integer class labels."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percentage of train held out when the data has no evaluation split."}
    )
    train_val_split: float | None = field(default=None, metadata={"help": TRAIN_VAL_SPLIT_HELP})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training images (before any per-class selection)."}
    )
    samples_per_class: int | None = field(
        default=None, metadata={"help": "Low-label runs: keep this many training images per class (seeded)."}
    )
    label_fraction: float | None = field(
        default=None, metadata={"help": "Low-label runs: keep this fraction of each class's training images (seeded)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})


@dataclass
class FineTuneRecipeArguments:
    """The official fine-tuning recipe beyond `TrainingArguments`."""

    recipe: str | None = field(
        default=None,
        metadata={"help": f"A named official fine-tuning recipe ({', '.join(recipe_names('fine-tuning'))}): its "
                  "epochs, learning rates, layer decay, drop path and resolution become the defaults (flags still win)."},
    )
    base_learning_rate: float = field(
        default=FINETUNING_DEFAULTS["base_learning_rate"],
        metadata={"help": "lr = base_learning_rate * total batch / 512 (unless --learning_rate)."},
    )
    warmup_learning_rate: float = field(
        default=FINETUNING_DEFAULTS["warmup_learning_rate"], metadata={"help": "Warmup start, scaled like the lr."}
    )
    min_learning_rate: float = field(
        default=FINETUNING_DEFAULTS["min_learning_rate"], metadata={"help": "Cosine end, scaled like the lr."}
    )
    warmup_prefix: bool = field(
        default=False,
        metadata={"help": "Decay the cosine over the steps after warmup (microsoft/Swin-Transformer's SwinV2 "
                  "fine-tuning) instead of over the whole run (microsoft/SimMIM's)."},
    )
    mixup: float = field(default=FINETUNING_DEFAULTS["mixup"], metadata={"help": "Mixup alpha (0 turns mixup off)."})
    cutmix: float = field(default=FINETUNING_DEFAULTS["cutmix"], metadata={"help": "CutMix alpha (0: off)."})
    mixup_prob: float = field(
        default=FINETUNING_DEFAULTS["mixup_prob"], metadata={"help": "Probability of mixing a batch."}
    )
    mixup_switch_prob: float = field(
        default=FINETUNING_DEFAULTS["mixup_switch_prob"], metadata={"help": "Probability of cutmix when both are on."}
    )
    label_smoothing: float = field(
        default=FINETUNING_DEFAULTS["label_smoothing"], metadata={"help": "Label smoothing (inside the mixed targets)."}
    )
    rand_augment: str = field(
        default=FINETUNING_DEFAULTS["rand_augment"],
        metadata={"help": "RandAugment policy in timm's notation (official 'rand-m9-mstd0.5-inc1'); 'none' turns it off."},
    )
    random_erasing: float = field(
        default=FINETUNING_DEFAULTS["random_erasing"], metadata={"help": "Random erasing probability (0: off)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a previous run in --output_dir."})
    no_weight_decay_names: str = field(
        default="",
        metadata={"help": "Comma-separated substrings of parameter names also exempt from weight decay, beyond the "
                  "official code's (e.g. 'relative_position_bias_table'). Unset: only the official ones."},
    )


def accelerator_available():
    """Whether torch sees a GPU or another accelerator the Trainer would use."""
    if torch.cuda.is_available():
        return True
    for name in ("xpu", "mps", "npu", "mlu", "musa"):
        backend = getattr(torch, name, None) or getattr(torch.backends, name, None)
        try:
            if backend is not None and backend.is_available():
                return True
        except Exception:  # an unusable backend is an unavailable one
            continue
    return False


def default_dataloader_workers(accelerator=None):
    """DataLoader workers per process when none are asked for: 0 without an accelerator (the laptop run decodes in
    the main process), else the CPUs each local process may use, less one for the process itself, at most 16: a
    ViT-B/16 step at 224 px takes thousands of images/s, and one CPU decodes and crops a few hundred (measure yours
    with benchmarks/data_pipeline.py)."""
    if not (accelerator_available() if accelerator is None else accelerator):
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(16, cpus // local_processes - 1))


# Set by the run whatever the command line says: each is required for SimMIM's inputs to reach the model and for
# evaluation to report a loss.
FORCED_TRAINING_ARGUMENTS = {
    "remove_unused_columns": False,
    "label_names": ["bool_masked_pos"],
    "prediction_loss_only": True,
}


def simmim_training_defaults():
    """`TrainingArguments` defaults of a SimMIM run (flags given on the command line override them)."""
    try:
        import tensorboard  # noqa: F401

        report_to = "tensorboard"
    except ImportError:
        report_to = "none"
    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    accelerator = accelerator_available()
    workers = default_dataloader_workers(accelerator)
    return {
        "output_dir": DEFAULT_OUTPUT_DIR,
        "per_device_train_batch_size": 64,
        "per_device_eval_batch_size": 128,
        "num_train_epochs": PRETRAINING_DEFAULTS["num_train_epochs"],
        "warmup_steps": PRETRAINING_DEFAULTS["warmup_steps"],
        **OPTIMIZER_DEFAULTS,
        "logging_steps": 0.04,
        "logging_first_step": True,
        "eval_strategy": "steps",
        "eval_steps": 0.25,
        "save_strategy": "steps",
        "save_steps": 0.25,
        "save_total_limit": 2,
        "report_to": report_to,
        "bf16": bf16,
        "use_cpu": not accelerator,
        "dataloader_num_workers": workers,
        # keep the workers between epochs where they are forked: the epoch that seeds crops and masks then reaches
        # them through shared memory (spawned workers get a copy: they are started afresh each epoch instead)
        "dataloader_persistent_workers": workers > 0 and multiprocessing.get_context().get_start_method() == "fork",
        # batches copied to the GPU asynchronously from pinned memory (pin_memory is the Trainer's default), so
        # the copy does not make the CPU wait for the previous step before it queues the next
        "accelerator_config": {"non_blocking": True} if accelerator else None,
        "ddp_find_unused_parameters": False,  # every parameter takes part in the SimMIM loss
        # Trainer's filter reads every step's loss on the host (a sync per step) and would log a NaN loss as the
        # mean of the others; the recipe's non-finite check reads it only where the Trainer waits anyway
        "logging_nan_inf_filter": False,
        **FORCED_TRAINING_ARGUMENTS,
    }



def finetune_training_defaults():
    """`TrainingArguments` defaults of a fine-tuning run: the pretraining ones with classification labels."""
    defaults = simmim_training_defaults()
    defaults.update(
        output_dir=FINETUNE_OUTPUT_DIR,
        num_train_epochs=FINETUNING_DEFAULTS["num_train_epochs"],
        warmup_steps=FINETUNING_DEFAULTS["warmup_steps"],
        label_names=["labels"],
        prediction_loss_only=False,
        metric_for_best_model="top1",
        greater_is_better=True,
    )
    return defaults


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with the script's description as written and argparse's "(default: X)" after each flag, except an
    unset one (None or empty): its help says what happens then."""

    def _get_help_string(self, action):
        if action.default is None or action.default == "" or getattr(action, "decided_by_the_run", False):
            return action.help
        return super()._get_help_string(action)


def argument_parser(dataclass_types, description=None):
    """`HfArgumentParser` that takes no abbreviation (`--max_step` for `--max_steps` would also hide the flag from
    `given`), with `HelpFormatter`."""
    return HfArgumentParser(
        dataclass_types,
        usage="%(prog)s [--flag value ...]  or  %(prog)s args.json",  # not the hundreds of flags: the help has them
        description=description,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )


def _describe_negated_flags(parser):
    """HfArgumentParser gives `--no_X` the help of `--X` and a printed default of False; say what it does."""
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            state = "on" if parser.get_default(action.dest) else "off"
            action.help = f"Turn --{action.dest} off (it is {state} by default)."
            action.default = argparse.SUPPRESS  # the value comes from --X's default


# TrainingArguments flags whose value, when not given, the run decides: their own defaults would mislead in --help.
DECIDED_BY_THE_RUN = {
    "learning_rate": "default: --base_learning_rate x total batch / 512, the scaling rule",
    "lr_scheduler_type": {
        "pretraining": "used only with --lr_schedule trainer",
        "fine-tuning": "not used: fine-tuning follows the official warmup + cosine",
    },
    "output_dir": {
        "pretraining": f"default: {DEFAULT_OUTPUT_DIR}",
        "fine-tuning": f"default: {FINETUNE_OUTPUT_DIR}, or outputs/simmim-linear-probe / outputs/simmim-knn by --mode",
    },
}


def _describe_flags_decided_by_the_run(parser, stage):
    for action in parser._actions:
        if action.dest in DECIDED_BY_THE_RUN:
            text = DECIDED_BY_THE_RUN[action.dest]
            action.help = f"{action.help} ({text[stage] if isinstance(text, dict) else text})."
            action.decided_by_the_run = True


def _check_flags_exist(parser, argv):
    """Refuse a flag the parser does not know, naming the closest ones (abbreviations are not taken)."""
    options = parser._option_string_actions
    names = [name for name in options if name.startswith("--") and "-" not in name[2:]]  # not the -h, --max-steps
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag != "--" and flag not in options:
            close = difflib.get_close_matches(flag, names, n=2)
            hint = f"did you mean {' or '.join(close)}?" if close else "see --help for the flags."
            raise ValueError(f"Unknown flag {flag}: {hint} Flags are not abbreviated.")


def _given_flags(parser, argv):
    """The fields `argv` sets, by the parser's own reading of each flag (`--no_x` sets `x`)."""
    options = parser._option_string_actions
    return {options[token.split("=", 1)[0]].dest for token in argv if token.split("=", 1)[0] in options}


def _named_recipe(argv, values, stage):
    """The recipe a command line (`argv`) or JSON file (`values`) names with `--recipe`, or None."""
    name = values.get("recipe") if values is not None else None
    for position, token in enumerate(argv if values is None else ()):
        if token == "--recipe" and position + 1 < len(argv):
            name = argv[position + 1]
        elif token.startswith("--recipe="):
            name = token.split("=", 1)[1]
    return get_recipe(name, stage) if name else None


def parse_with_defaults(parser, defaults, argv=None, stage="pretraining"):
    """Parse `argv` (a list like `sys.argv[1:]`, or one `.json` file) with `defaults`, then the values of the
    recipe named by `--recipe`, replacing the dataclasses' own; return `(dataclasses, given)`, `given` being the
    names set explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = None
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            values = json.load(handle)
    recipe = _named_recipe(argv, values, stage)
    defaults = {**defaults, **(recipe_defaults(recipe) if recipe else {})}
    if values is not None:
        parsed, given = parser.parse_dict({**defaults, **values}), set(values)
    else:
        parser.set_defaults(**defaults)
        _describe_negated_flags(parser)
        _describe_flags_decided_by_the_run(parser, stage)
        _check_flags_exist(parser, argv)
        parsed, given = parser.parse_args_into_dataclasses(args=argv), _given_flags(parser, argv)
    if recipe and recipe.config_overrides and "config_overrides" in given:
        model_args = parsed[0]  # the user's overrides add to the recipe's (and win where both name a field)
        model_args.config_overrides = f"{recipe.config_overrides},{model_args.config_overrides}"
    return parsed, given


def apply_train_val_split(data_args, given):
    """transformers' `--train_val_split` (a fraction) as `--validation_split_percentage`."""
    if data_args.train_val_split is None:
        return
    if "validation_split_percentage" in given:
        raise ValueError(
            "Give --train_val_split (a fraction, transformers' name) or --validation_split_percentage (a "
            "percentage), not both."
        )
    if not 0.0 <= data_args.train_val_split < 1.0:
        raise ValueError(
            f"--train_val_split={data_args.train_val_split} is a fraction of the training images: give a value in "
            "[0, 1), e.g. 0.15, or a percentage with --validation_split_percentage."
        )
    data_args.validation_split_percentage = data_args.train_val_split * 100.0


def apply_mask_column(model_args, data_args):
    """`--mask_column` sets `--mask_strategy user`; another strategy with it, or `user` without it, is refused."""
    if data_args.mask_column and model_args.mask_strategy not in (None, "user"):
        raise ValueError(
            f"--mask_column {data_args.mask_column} gives each image its own mask, but --mask_strategy "
            f"{model_args.mask_strategy} draws them: drop one of the two."
        )
    if model_args.mask_strategy == "user" and not data_args.mask_column:
        raise ValueError("--mask_strategy user takes each image's mask from a column: name it with --mask_column.")
    if data_args.mask_column:
        model_args.mask_strategy = "user"


def apply_model_type(model_args):
    """`--model_type vit|swin` with no model named: the paper's base model of that backbone (whether a named model
    has that backbone is checked when it is loaded)."""
    if model_args.model_type is None:
        return
    if model_args.model_type not in MODEL_TYPES:
        raise ValueError(
            f"--model_type {model_args.model_type} is not a SimMIM model type: use one of {', '.join(MODEL_TYPES)}, "
            "or name a model with --preset, --config_file or --model_name_or_path."
        )
    named = model_args.model_name_or_path or model_args.preset or model_args.config_file
    if not named and model_args.model_type in MODEL_TYPE_PRESETS:
        model_args.preset = MODEL_TYPE_PRESETS[model_args.model_type]


def check_streaming_arguments(data_args, training_args, given):
    """Refuse, before anything loads, what a stream cannot do: count epochs (`--max_steps` is needed, unless a
    resumed run takes it from its checkpoint), cut its first N images, or hold out a share of itself."""
    if not data_args.streaming:
        return
    if training_args.max_steps <= 0 and training_args.resume_from_checkpoint is None:
        raise ValueError(
            "--streaming needs --max_steps: a stream has no length, so --num_train_epochs cannot be counted. Give "
            "--max_steps N (e.g. epochs x images / total batch)."
        )
    refused = {
        "max_train_samples": "streaming reads whole shards: name fewer shards (a glob such as 'data/train-0000*')",
        "validation_split_percentage": "a stream has no length to hold a share out of: give --validation_dir or a "
        "dataset with a validation split",
    }
    for name, fix in refused.items():
        if name in given or (name == "validation_split_percentage" and "train_val_split" in given):
            raise ValueError(f"--{name} does not apply with --streaming: {fix}.")
    if data_args.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size={data_args.shuffle_buffer_size}: give at least 1 (1: no shuffling).")


def parse_run_arguments(argv=None, description=None):
    """Parse a run's arguments (a list like `sys.argv[1:]`, or one `.json` file) into
    `(ModelArguments, DataArguments, RecipeArguments, TrainingArguments, given)`, `given` being the names set
    explicitly (so SimMIM defaults and rules apply only to the others). `description` opens `--help`."""
    parser = argument_parser((ModelArguments, DataArguments, RecipeArguments, TrainingArguments), description)
    parsed, given = parse_with_defaults(parser, simmim_training_defaults(), argv)
    model_args, data_args, recipe_args, training_args = parsed
    if "preset" not in given and (model_args.model_name_or_path or model_args.config_file):
        model_args.preset = None  # a recipe's model preset applies only when no model is named
    apply_model_type(model_args)
    apply_train_val_split(data_args, given)
    apply_mask_column(model_args, data_args)
    check_streaming_arguments(data_args, training_args, given)
    if model_args.trust_remote_code:
        logger.warning("--trust_remote_code changes nothing here: no checkpoint or dataset code is run.")
    for name, value in FORCED_TRAINING_ARGUMENTS.items():
        if name in given and getattr(training_args, name) != value:
            logger.warning(
                "Ignoring --%s=%s: a SimMIM run needs %s=%s.", name, getattr(training_args, name), name, value
            )
        setattr(training_args, name, value)
    if recipe_args.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr_schedule={recipe_args.lr_schedule!r} is not supported: use one of {SCHEDULES}.")
    return model_args, data_args, recipe_args, training_args, given


def parse_finetune_arguments(argv=None, description=None):
    """`(model_args, data_args, recipe_args, training_args, given)`; `given` holds the flags set explicitly.
    `description` opens `--help`."""
    parser = argument_parser(
        (FineTuneModelArguments, FineTuneDataArguments, FineTuneRecipeArguments, TrainingArguments), description
    )
    parsed, given = parse_with_defaults(parser, finetune_training_defaults(), argv, stage="fine-tuning")
    model_args, data_args, recipe_args, training_args = parsed
    apply_train_val_split(data_args, given)
    training_args.remove_unused_columns = False  # the image column must reach the transform
    if model_args.from_scratch and "layer_decay" not in given:
        model_args.layer_decay = None  # a recipe's layer decay protects pretrained layers; a baseline has none
    if "output_dir" not in given and model_args.mode != "finetune":  # a probe must not replace another's results
        training_args.output_dir = os.path.join("outputs", f"simmim-{model_args.mode.replace('_', '-')}")
    if model_args.mode not in MODES:
        raise ValueError(f"--mode={model_args.mode!r} is not supported: use one of {MODES}.")
    if model_args.model_name_or_path is None and not (model_args.from_scratch and model_args.preset):
        raise ValueError(
            "--model_name_or_path is required (a SimMIM checkpoint, e.g. the output folder of run_mim.py); for a "
            "from-scratch baseline without a checkpoint pass --from_scratch --preset NAME."
        )
    if str(recipe_args.rand_augment).lower() in ("none", "", "off", "false"):
        recipe_args.rand_augment = None
    if recipe_args.rand_augment is not None:
        try:
            parse_rand_augment(recipe_args.rand_augment)
        except ValueError as error:
            raise ValueError(f"--{error}") from None
    if not 0.0 <= recipe_args.random_erasing <= 1.0:
        raise ValueError(f"--random_erasing={recipe_args.random_erasing} is a probability: give a value in [0, 1].")
    if data_args.samples_per_class is not None and data_args.label_fraction is not None:
        raise ValueError("Give --samples_per_class or --label_fraction, not both.")
    if data_args.label_fraction is not None and not 0.0 < data_args.label_fraction <= 1.0:
        raise ValueError(f"--label_fraction={data_args.label_fraction} must lie in (0, 1].")
    if data_args.samples_per_class is not None and data_args.samples_per_class < 1:
        raise ValueError(f"--samples_per_class={data_args.samples_per_class} must be at least 1.")
    return model_args, data_args, recipe_args, training_args, given
