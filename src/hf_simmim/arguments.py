"""What a pretraining run is asked to do: the command-line arguments of `examples/run_mim.py` (model, data,
recipe, and `transformers.TrainingArguments` with SimMIM defaults), and turning them into a model, a learning rate
and an output folder.

SimMIM defaults replace `TrainingArguments`' own where the recipe differs (weight decay 0.05, clipping 5.0,
warmup 10% of the run (10/800 with the multistep schedule), bf16 where the GPU has it, evaluation and pictures 4
times a run); any flag given on the command line wins. The footguns of transformers' `run_mim.py` are fixed
here, not left to the user: `remove_unused_columns=False` (the image column must reach the transform),
`label_names=["bool_masked_pos"]` (otherwise no eval loss), and `use_cpu=True` on a machine without an
accelerator (otherwise `accelerate launch --multi_gpu` there runs independent, non-distributed copies).
"""

import inspect
import json
import logging
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .configuration_simmim import PRESETS, SimMIMConfig
from .image_processing_simmim import SimMIMImageProcessor
from .training import (
    LR_REFERENCE_BATCH_SIZE,
    SCHEDULES,
    SimMIMRecipe,
    scale_learning_rate,
    total_train_batch_size,
)

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "vit-tiny-test"
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "simmim-pretraining")

# Base learning rates (per 512 images) and warmup start of the official configs: the 100-epoch cosine configs
# (Swin-B) and the 800-epoch multistep configs (Swin-B/L, ViT-B).
RECIPE_BASE_LEARNING_RATES = {"cosine": (2e-4, 1e-6), "multistep": (1e-4, 5e-7), "trainer": (2e-4, 1e-6)}
# Every official config warms up for 10 epochs: 10% of the 100-epoch runs (the default `warmup_steps`), 10 of 800
# epochs for the multistep configs.
MULTISTEP_WARMUP_FRACTION = 10 / 800
# The tiny CPU presets are ~1000x smaller than ViT-B: at the paper's 2e-4 their loss barely moves in the
# one-minute default run (0.92 -> 0.87 in 300 steps), at 8e-3 it falls to ~0.72.
PRESET_BASE_LEARNING_RATES = {"vit-tiny-test": 8e-3, "swin-tiny-test": 8e-3}


@dataclass
class ModelArguments:
    """Which model to pretrain: a preset, a `SimMIMConfig` JSON file, or an existing checkpoint (continue
    pretraining). Nothing given: the tiny preset `vit-tiny-test`."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A SimMIM checkpoint (folder or hub id) to continue pretraining."}
    )
    preset: str | None = field(
        default=None,
        metadata={"help": f"A SimMIMConfig preset: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET})."},
    )
    config_file: str | None = field(default=None, metadata={"help": "A SimMIMConfig JSON file (config.json)."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config fields to override, e.g. 'mask_ratio=0.5,drop_path_rate=0.0' (JSON values)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where hub downloads are cached."})


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
        default=5.0, metadata={"help": "Share of train held out for validation when the data has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    num_reconstruction_images: int = field(
        default=8, metadata={"help": "Validation images drawn in the reconstruction picture (0: no picture)."}
    )
    eval_mask_seed: int = field(default=0, metadata={"help": "Seed of the fixed evaluation masks and pictures."})


@dataclass
class RecipeArguments:
    """The SimMIM recipe beyond `TrainingArguments`."""

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
        default=1e-5, metadata={"help": "Learning rate the cosine ends at (scaled like the base learning rate)."}
    )
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine (100-epoch configs), multistep (800-epoch configs), or trainer (--lr_scheduler_type)."
        },
    )
    lr_milestones: list[float] = field(
        default_factory=lambda: [0.875],
        metadata={"help": "multistep: where the learning rate drops, as fractions of the run (700/800) or steps."},
    )
    lr_decay_gamma: float = field(default=0.1, metadata={"help": "multistep: the factor at each milestone."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a previous run in --output_dir (the default output dir always is)."}
    )
    stop_on_nonfinite_loss: bool = field(default=True, metadata={"help": "Stop at a NaN/inf loss, naming the step."})
    model_card_license: str = field(default="apache-2.0", metadata={"help": "License in the model card metadata."})


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
        "num_train_epochs": 30.0,
        "weight_decay": 0.05,
        "max_grad_norm": 5.0,
        "warmup_steps": 0.1,
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
        "remove_unused_columns": False,
        "label_names": ["bool_masked_pos"],
        "prediction_loss_only": True,
    }


# Set by the run whatever the command line says: each is required for SimMIM's inputs to reach the model and for
# evaluation to report a loss.
FORCED_TRAINING_ARGUMENTS = {
    "remove_unused_columns": False,
    "label_names": ["bool_masked_pos"],
    "prediction_loss_only": True,
}


def _given_flags(argv):
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def parse_with_defaults(parser, defaults, argv=None):
    """Parse `argv` (a list like `sys.argv[1:]`, or one `.json` file) with `defaults` replacing the dataclasses'
    own; return `(dataclasses, given)`, `given` being the names set explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            values = json.load(handle)
        return parser.parse_dict({**defaults, **values}), set(values)
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv), _given_flags(argv)


def parse_run_arguments(argv=None):
    """Parse a run's arguments (a list like `sys.argv[1:]`, or one `.json` file) into
    `(ModelArguments, DataArguments, RecipeArguments, TrainingArguments, given)`, `given` being the names set
    explicitly (so SimMIM defaults and rules apply only to the others)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, RecipeArguments, TrainingArguments))
    parsed, given = parse_with_defaults(parser, simmim_training_defaults(), argv)
    model_args, data_args, recipe_args, training_args = parsed
    for name, value in FORCED_TRAINING_ARGUMENTS.items():
        if name in given and getattr(training_args, name) != value:
            logger.warning(
                "Ignoring --%s=%s: a SimMIM run needs %s=%s.", name, getattr(training_args, name), name, value
            )
        setattr(training_args, name, value)
    if recipe_args.lr_schedule not in SCHEDULES:
        raise ValueError(f"--lr_schedule={recipe_args.lr_schedule!r} is not supported: use one of {SCHEDULES}.")
    return model_args, data_args, recipe_args, training_args, given


def start_run(training_args):
    """Logging as the examples want it (INFO on the main process, warnings elsewhere) and the run's seed."""
    import transformers
    from transformers.trainer_utils import set_seed

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logging.getLogger().setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)


def load_run_datasets(data_args, training_args, cache_dir=None):
    """`(train, validation)` of a run from its data arguments (the main process loads first; the others reuse
    its cache), cut to `max_eval_samples` (and `max_train_samples` where the run has it)."""
    from .data import load_image_datasets

    with training_args.main_process_first(desc="loading the dataset"):
        train, validation = load_image_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_dir,
            data_args.validation_dir,
            data_args.validation_split_percentage,
            seed=training_args.seed,
            cache_dir=cache_dir,
        )
    max_train = getattr(data_args, "max_train_samples", None)
    if max_train is not None:
        train = train.select(range(min(max_train, len(train))))
    if validation is not None and data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    return train, validation


def describe_data(data_args, train, validation, image_column):
    """One sentence on a run's data, for the log and the model card."""
    if data_args.dataset_name:
        source = f"`{data_args.dataset_name}`"
        if data_args.dataset_config_name:
            source += f" ({data_args.dataset_config_name})"
    elif data_args.train_dir:
        source = f"`{data_args.train_dir}`"
        if data_args.validation_dir:
            source += f", validation `{data_args.validation_dir}`"
    else:
        source = "the CIFAR-10 sample bundled with hf_simmim (32x32 images)"
    counts = f"{len(train):,} training images" + (f", {len(validation):,} validation images" if validation else "")
    return f"{source}: {counts}, image column `{image_column}`"


# ---------------------------------------------------------------------------------------------- learning rate
def resolve_recipe_defaults(recipe_args, model_args):
    """Fill `base_learning_rate` / `warmup_learning_rate` left unset: the official config's values for the
    schedule, or the tiny presets' own base learning rate."""
    base_lr, warmup_lr = RECIPE_BASE_LEARNING_RATES[recipe_args.lr_schedule]
    preset = model_args.preset or (
        DEFAULT_PRESET if not (model_args.model_name_or_path or model_args.config_file) else None
    )
    if recipe_args.base_learning_rate is None:
        recipe_args.base_learning_rate = PRESET_BASE_LEARNING_RATES.get(preset, base_lr)
    if recipe_args.warmup_learning_rate is None:
        recipe_args.warmup_learning_rate = warmup_lr
    return recipe_args


def set_learning_rate(training_args, base_learning_rate, given):
    """Set `training_args.learning_rate = base_learning_rate x total batch / 512` unless `--learning_rate` was
    given. Return `(scale, rule)`: the factor from base to actual learning rate (warmup and minimum learning rates
    scale by it too) and a one-line description of the rule."""
    if "learning_rate" in given:
        scale = training_args.learning_rate / base_learning_rate if base_learning_rate else 0
        return scale, "set with --learning_rate; warmup and minimum learning rates scaled alike"
    total = total_train_batch_size(training_args)
    training_args.learning_rate = scale_learning_rate(base_learning_rate, total)
    rule = f"base {base_learning_rate:g} x total batch {total} / {LR_REFERENCE_BATCH_SIZE}"
    return total / LR_REFERENCE_BATCH_SIZE, rule


def apply_learning_rate(training_args, recipe_args, given):
    """Set `training_args.learning_rate` by the scaling rule (unless `--learning_rate` was given), and the warmup
    of the multistep (800-epoch) configs (unless `--warmup_steps` was given); return the `SimMIMRecipe` with
    `warmup_lr`/`min_lr` scaled like the learning rate, plus a one-line description of the rule.
    `recipe_args` must have its defaults resolved (`resolve_recipe_defaults`)."""
    if recipe_args.lr_schedule == "multistep" and "warmup_steps" not in given:
        training_args.warmup_steps = MULTISTEP_WARMUP_FRACTION
    scale, rule = set_learning_rate(training_args, recipe_args.base_learning_rate, given)
    recipe = SimMIMRecipe(
        schedule=recipe_args.lr_schedule,
        warmup_lr=recipe_args.warmup_learning_rate * scale,
        min_lr=recipe_args.min_learning_rate * scale,
        milestones=tuple(recipe_args.lr_milestones),
        gamma=recipe_args.lr_decay_gamma,
        stop_on_nonfinite_loss=recipe_args.stop_on_nonfinite_loss,
    )
    return recipe, rule


# ---------------------------------------------------------------------------------------------- output folder
def _holds_a_run(path):
    if not os.path.isdir(path):
        return False
    entries = os.listdir(path)
    return any(
        e.startswith("checkpoint-") or e in ("model.safetensors", "config.json", "trainer_state.json") for e in entries
    )


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def prepare_output_dir(training_args, recipe_args, model_args, given):
    """Decide what happens to a previous run in the output folder; return the checkpoint to resume from (or None).

    - `--resume_from_checkpoint PATH` resumes from PATH; `--resume_from_checkpoint last` (or `true`) from the
      newest `checkpoint-*` of the output folder.
    - Otherwise a previous run is replaced when the output folder is the default one or with
      `--overwrite_output_dir`; else the run is refused with what to do. A folder holding the checkpoint being
      continued from is never deleted.
    """
    output_dir = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    if resume is not None:
        if str(resume).lower() in ("last", "latest", "true", "auto"):
            resume = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
            if resume is None:
                raise ValueError(
                    f"--resume_from_checkpoint last: no checkpoint-* folder in {output_dir!r} to resume from. Pass a "
                    "checkpoint path, or drop the flag to start a new run."
                )
        elif not os.path.isdir(resume):
            raise ValueError(f"--resume_from_checkpoint {resume!r} is not a folder: pass a checkpoint-* folder.")
        return str(resume)
    if not _holds_a_run(output_dir):
        return None
    is_default = "output_dir" not in given
    if not (is_default or recipe_args.overwrite_output_dir):
        raise ValueError(
            f"The output folder {output_dir!r} already holds a run. Pass --overwrite_output_dir to replace it, "
            f"--resume_from_checkpoint last to continue it, or another --output_dir."
        )
    if (
        model_args.model_name_or_path
        and os.path.exists(model_args.model_name_or_path)
        and _inside(model_args.model_name_or_path, output_dir)
    ):
        raise ValueError(
            f"The output folder {output_dir!r} holds the checkpoint being continued ({model_args.model_name_or_path}):"
            " choose another --output_dir for the new run."
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()  # every process has looked at the folder before it goes
    if training_args.process_index == 0:
        logger.warning(
            "Replacing the previous run in %s (to continue it instead, pass --resume_from_checkpoint last).",
            output_dir,
        )
        shutil.rmtree(output_dir)
    if distributed:
        torch.distributed.barrier()
    return None


# ---------------------------------------------------------------------------------------------- model
def _parse_overrides(text):
    overrides = {}
    if not text:
        return overrides
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(
                f"--config_overrides: {item!r} is not key=value (e.g. 'mask_ratio=0.5,drop_path_rate=0.0')."
            )
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    fields = set(inspect.signature(SimMIMConfig.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides) - fields - set(SimMIMConfig().to_dict()) - {"num_labels"})
    if unknown:
        raise ValueError(
            f"--config_overrides: {', '.join(unknown)} is not a SimMIMConfig field (the config would ignore it "
            f"silently). Its fields: {', '.join(sorted(fields))}."
        )
    return overrides


def load_pretraining_model(model_args):
    """`(SimMIMForMaskedImageModeling, SimMIMImageProcessor)` from a checkpoint, a config file or a preset."""
    from .modeling_simmim import SimMIMForMaskedImageModeling

    sources = [s for s in (model_args.model_name_or_path, model_args.preset, model_args.config_file) if s]
    if len(sources) > 1:
        raise ValueError("Give only one of --model_name_or_path, --preset and --config_file.")
    overrides = _parse_overrides(model_args.config_overrides)
    if model_args.model_name_or_path:
        model = SimMIMForMaskedImageModeling.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, **overrides
        )
        try:
            processor = SimMIMImageProcessor.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir
            )
        except OSError:
            processor = SimMIMImageProcessor.from_model_config(model.config)
        if (processor.image_size, processor.patch_size, processor.mask_patch_size, processor.mask_ratio) != (
            model.config.image_size,
            model.config.patch_size,
            model.config.mask_patch_size,
            model.config.mask_ratio,
        ):
            logger.warning(
                "The checkpoint's image processor does not match its config; rebuilding it from the config."
            )
            processor = SimMIMImageProcessor.from_model_config(model.config)
        processor.rand_augment, processor.random_erasing = None, 0.0  # SimMIM pretrains with crop and flip only
        return model, processor
    if model_args.config_file:
        config_dict = SimMIMConfig.get_config_dict(model_args.config_file)[0]
        config_dict.update(overrides)
        config = SimMIMConfig.from_dict(config_dict)
    else:
        config = SimMIMConfig.from_preset(model_args.preset or DEFAULT_PRESET, **overrides)
    return SimMIMForMaskedImageModeling(config), SimMIMImageProcessor.from_model_config(config)
