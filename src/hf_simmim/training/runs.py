"""Setting up a run from its arguments: logging and seed, the datasets, the learning rate, the output folder and
the model to train."""

import inspect
import json
import logging
import os
import shutil

import torch
from transformers.trainer_utils import get_last_checkpoint

from ..data.checks import check_not_empty
from ..data.loading import load_image_datasets
from ..models.configuration_simmim import SimMIMConfig
from ..models.image_processing_simmim import SimMIMImageProcessor
from ..models.modeling_simmim import SimMIMForMaskedImageModeling
from .arguments import DEFAULT_PRESET
from .optim import LR_REFERENCE_BATCH_SIZE, scale_learning_rate, total_train_batch_size
from .recipes import MULTISTEP_WARMUP_FRACTION, PRESET_BASE_LEARNING_RATES, SCHEDULE_LEARNING_RATES
from .schedules import SimMIMRecipe
from .trainer import count_unreadable_images

logger = logging.getLogger(__name__)


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
    its cache), cut to `max_eval_samples` (and `max_train_samples` where the run has it). An empty training
    split is refused; an empty validation split becomes None, with a warning."""
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
    check_not_empty(train, "train")
    if validation is not None and len(validation) == 0:
        logger.warning("The validation split is empty: the run has no evaluation.")
        validation = None
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


def resolve_recipe_defaults(recipe_args, model_args):
    """Fill `base_learning_rate` / `warmup_learning_rate` left unset: the official config's values for the
    schedule, or the tiny presets' own base learning rate."""
    base_lr, warmup_lr = SCHEDULE_LEARNING_RATES[recipe_args.lr_schedule]
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
        no_weight_decay_names=recipe_args.no_weight_decay_names,
    )
    return recipe, rule


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


def parse_config_overrides(text):
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
    sources = [s for s in (model_args.model_name_or_path, model_args.preset, model_args.config_file) if s]
    if len(sources) > 1:
        raise ValueError("Give only one of --model_name_or_path, --preset and --config_file.")
    overrides = parse_config_overrides(model_args.config_overrides)
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
        return model, processor
    if model_args.config_file:
        config_dict = SimMIMConfig.get_config_dict(model_args.config_file)[0]
        config_dict.update(overrides)
        config = SimMIMConfig.from_dict(config_dict)
    else:
        config = SimMIMConfig.from_preset(model_args.preset or DEFAULT_PRESET, **overrides)
    return SimMIMForMaskedImageModeling(config), SimMIMImageProcessor.from_model_config(config)


def skipped_image_counts(train_dataset, eval_dataset=None, trainer=None):
    """`{"train_skipped_images": n, "eval_skipped_images": m}`: the distinct images of each `SeededImageDataset`
    that could not be decoded (and were skipped) so far. With a `trainer`, counted over all its processes: then
    call it on every process."""

    def count(dataset):
        if dataset is None:
            return 0
        return count_unreadable_images(trainer, dataset) if trainer is not None else int(dataset.unreadable_mask.sum())

    return {"train_skipped_images": count(train_dataset), "eval_skipped_images": count(eval_dataset)}
