"""Setting up a run from its arguments: logging and seed, the datasets, the learning rate, the output folder and
the model to train."""

import inspect
import json
import logging
import math
import os
import shutil

import torch
from accelerate.utils import gather_object
from transformers.image_processing_base import ImageProcessingMixin
from transformers.trainer_utils import get_last_checkpoint

from ..data.checks import check_not_empty, run_pixel_format
from ..data.loading import load_image_datasets
from ..data.pixels import pixel_type_of
from ..data.streaming import StreamingImageDataset, stream_head
from ..data.statistics import channel_statistics
from ..models.configuration_simmim import SimMIMConfig
from ..models.image_processing_simmim import SimMIMImageProcessor
from ..models.modeling_simmim import SimMIMForMaskedImageModeling
from .arguments import DEFAULT_PRESET, accelerator_available
from .distributed import check_distributed_launch
from .optim import LR_REFERENCE_BATCH_SIZE, scale_learning_rate, total_train_batch_size
from .recipes import MULTISTEP_WARMUP_FRACTION, PRESET_BASE_LEARNING_RATES, SCHEDULE_LEARNING_RATES
from .schedules import SimMIMRecipe
from .trainer import count_unreadable_images

logger = logging.getLogger(__name__)


def start_run(training_args):
    """Refuse a launch whose sharding this machine would silently drop (`check_distributed_launch`), before any
    work; then logging as the examples want it (INFO on the main process, warnings elsewhere) and the run's seed."""
    import transformers
    from transformers.trainer_utils import set_seed

    check_distributed_launch(accelerator=not training_args.use_cpu and accelerator_available())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logging.getLogger().setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)


def load_run_datasets(data_args, training_args, cache_dir=None, token=None):
    """`(train, validation)` of a run from its data arguments (the main process loads first; the others reuse
    its cache), cut to `max_train_samples` and `max_eval_samples`. An empty training split is refused; an empty
    validation split becomes None, with a warning. `token` reaches a hub dataset.

    With `data_args.streaming`, `train` is a `datasets.IterableDataset` (`StreamingImageDataset` serves it) and the
    validation images are read once, here, into a `Dataset` (the first `max_eval_samples` of them)."""
    streaming = getattr(data_args, "streaming", False)
    with training_args.main_process_first(desc="loading the dataset"):
        train, validation = load_image_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_dir,
            data_args.validation_dir,
            data_args.validation_split_percentage,
            seed=training_args.seed,
            cache_dir=cache_dir,
            token=token,
            streaming=streaming,
        )
        if streaming and validation is not None:
            validation = stream_head(validation, data_args.max_eval_samples)
        elif streaming:
            logger.info("Streaming: no validation images (a stream has no share to hold out); give --validation_dir "
                        "or a dataset with a validation split to evaluate.")
    if data_args.max_train_samples is not None and not streaming:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if validation is not None and data_args.max_eval_samples is not None:
        validation = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    if not streaming:  # a stream's first images are checked when the run reads them (`stream_head`)
        check_not_empty(train, "train")
    if validation is not None and len(validation) == 0:
        logger.warning("The validation split is empty: the run has no evaluation.")
        validation = None
    return train, validation


def describe_pixels(processor):
    """How a processor reads images, for the model card: "RGB" or e.g. "1 channel, pixels x 1.5259e-05"."""
    if processor.converts_to_rgb:
        return "read as 8-bit RGB"
    count = processor.num_channels
    return f"{count} channel{'s' * (count != 1)} at full precision, pixels x {processor.rescale_factor:.6g}"


def describe_data(data_args, train, validation, image_column, processor=None):
    """One sentence on a run's data, for the log and the model card (with `processor`: how images are read)."""
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
    counts = f"{len(train):,} training images" if hasattr(train, "__len__") else (
        f"training images streamed from {train.num_shards} shard(s)"
    )
    counts += f", {len(validation):,} validation images" if validation else ""
    details = [f"image column `{image_column}`"] + [describe_pixels(processor)] * (processor is not None)
    if getattr(data_args, "mask_column", None):
        details.append(f"user masks from column `{data_args.mask_column}`")
    return f"{source}: {counts}, {', '.join(details)}"


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
        warmup_prefix=recipe_args.warmup_prefix,
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


def keep_the_resumed_run_length(training_args, checkpoint, given):
    """Train a resumed run for the steps its checkpoint was planned for (`--max_steps` from its
    `trainer_state.json`): the learning-rate schedule restored with it (warmup, decay, milestones) counts those
    steps. A `--max_steps` or `--num_train_epochs` that asks for another length is refused."""
    state_path = os.path.join(checkpoint, "trainer_state.json")
    if not os.path.isfile(state_path):
        return
    with open(state_path, encoding="utf-8") as handle:
        state = json.load(handle)
    planned_steps, planned_epochs = state.get("max_steps"), state.get("num_train_epochs")
    if not planned_steps:
        return
    asked = None
    if "max_steps" in given and training_args.max_steps > 0:
        asked = "--max_steps" if training_args.max_steps != planned_steps else None
    elif "num_train_epochs" in given and math.ceil(training_args.num_train_epochs) != planned_epochs:
        asked = "--num_train_epochs"
    if asked:
        raise ValueError(
            f"{asked} {getattr(training_args, asked[2:]):g} asks for another length than the run being resumed "
            f"({checkpoint}: {planned_steps} steps, {planned_epochs} epochs), whose learning-rate schedule is "
            f"restored for {planned_steps} steps. Resume without {asked} (or with its value then), or start a new "
            f"run from its weights: --model_name_or_path {checkpoint} --output_dir NEW_DIR."
        )
    training_args.max_steps = planned_steps


def prepare_output_dir(training_args, recipe_args, model_args, given):
    """Decide what happens to a previous run in the output folder; return the checkpoint to resume from (or None).

    - `--resume_from_checkpoint PATH` resumes from PATH; `--resume_from_checkpoint last` (or `true`) from the
      newest `checkpoint-*` of the output folder, for the steps it was planned for (`keep_the_resumed_run_length`).
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
        keep_the_resumed_run_length(training_args, str(resume), given)
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


# The config fields an image processor shares with its model (input size, channels and masks); each is a flag, as
# the first four are in transformers' run_mim.py.
MASKING_GEOMETRY = ("image_size", "patch_size", "mask_patch_size", "mask_ratio", "mask_strategy", "num_channels")


def model_config_overrides(model_args):
    """`--config_overrides` plus `--image_size`, `--patch_size`, `--mask_patch_size`, `--mask_ratio`,
    `--mask_strategy` and `--num_channels`; a field given both ways with two values is refused."""
    overrides = parse_config_overrides(model_args.config_overrides)
    for name in MASKING_GEOMETRY:
        value = getattr(model_args, name)
        if value is not None and overrides.get(name, value) != value:
            raise ValueError(
                f"--{name} {value} and --config_overrides {name}={overrides[name]} disagree: give {name} once."
            )
        if value is not None:
            overrides[name] = value
    return overrides


def check_model_flags(config, model_args, overrides):
    """Refuse what the model cannot be: another backbone than `--model_type` names; for a checkpoint, another patch
    size or channel count (its patch embedding weights fix them). `config`: the checkpoint's own, or the one built."""
    source = model_args.model_name_or_path or model_args.config_file or f"preset {model_args.preset or DEFAULT_PRESET}"
    if model_args.model_type not in (None, "simmim", config.backbone):
        raise ValueError(
            f"--model_type {model_args.model_type} but {source} is a {config.backbone} model: drop --model_type or "
            f"name a {model_args.model_type} model."
        )
    for name in ("patch_size", "num_channels"):  # fixed by the checkpoint's patch embedding (and decoder) weights
        value = overrides.get(name, getattr(config, name))
        if model_args.model_name_or_path and value != getattr(config, name):
            flag = f"--{name} {value}" if getattr(model_args, name) is not None else f"--config_overrides {name}={value}"
            raise ValueError(
                f"{flag} disagrees with the checkpoint {source}, whose patch embedding is for {name} "
                f"{getattr(config, name)}: drop it to continue the checkpoint, or pretrain a new model (--preset or "
                f"--config_file) with {flag}."
            )


def check_rgb_model(config):
    """For runs whose images are RGB photos only (the CLIP image tower of `contrastive.py`): refuse another channel
    count before any work. run_mim.py and run_finetune.py take any channel count (`data_image_processor`)."""
    if config.num_channels != 3:
        raise ValueError(
            f"num_channels={config.num_channels}: this run reads RGB images only (3 channels). Use a model with "
            "num_channels=3 (run_mim.py and run_finetune.py train and fine-tune models of any channel count)."
        )


def saved_normalisation(source, hub_kwargs, flag=None):
    """`{image_mean, image_std, resample, rescale_factor}` of the image processor saved at `source` (ours, or
    transformers' own, e.g. an exported BEiT / ViT one), each where saved, or `{}` when there is none; with `flag`
    (the argument that named `source`), a missing or unreadable processor is an error naming it. `rescale_factor`:
    the pixel scale its mean and std are for (`data_image_processor` checks the run's images against it)."""
    try:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(source, **hub_kwargs)
    except (OSError, ValueError) as error:
        if flag:
            raise ValueError(f"{flag} {source}: no image processor could be read there ({error}).") from error
        return {}
    return {key: saved[key] for key in ("image_mean", "image_std", "resample", "rescale_factor") if key in saved}


def load_image_processor(model_args, config, hub_kwargs, train=None, image_column=None):
    """The run's image processor (`data_image_processor`), its normalisation from `--image_mean` / `--image_std`,
    else `--image_processor_name`'s, else the checkpoint's own processor's when it has one (with its resampling)."""
    if model_args.image_processor_name:
        saved = saved_normalisation(model_args.image_processor_name, hub_kwargs, flag="--image_processor_name")
    elif model_args.model_name_or_path:
        saved = saved_normalisation(model_args.model_name_or_path, hub_kwargs)
    else:
        saved = {}
    given = {key: getattr(model_args, key) for key in ("image_mean", "image_std") if getattr(model_args, key)}
    if len(given) == 1:
        raise ValueError("Give --image_mean and --image_std together (one value per channel each).")
    if given:  # statistics given for these images: the saved ones, and the pixel scale they were for, are not used
        saved.pop("rescale_factor", None)
    return data_image_processor(config, {**saved, **given}, train, image_column)


def data_image_processor(config, normalisation, train=None, image_column=None, **processor_kwargs):
    """The `SimMIMImageProcessor` of `config` for the images of `train` (`data.checks.run_pixel_format`: RGB photos,
    or each image's own channels at its precision; `train=None`: RGB photos), normalised with `normalisation`
    (`image_mean`, `image_std`, `resample`, each where given; `rescale_factor`: the pixel scale a saved mean and std
    are for, which these images must share). Images that are not RGB photos and have no mean and std given are
    normalised with their own per-channel statistics, from a pass over `train`
    (`data.statistics.channel_statistics`); RGB photos default to ImageNet's."""
    convert_rgb, rescale_factor = True, 1 / 255
    if train is not None:
        convert_rgb, rescale_factor = run_pixel_format(train, image_column, config.num_channels)
    normalisation = dict(normalisation)
    saved_scale = normalisation.pop("rescale_factor", None)
    if saved_scale is not None and not math.isclose(saved_scale, rescale_factor):
        raise ValueError(
            f"The checkpoint's image processor normalises {pixel_type_of(saved_scale)} (rescale_factor "
            f"{saved_scale:.6g}), but these images hold {pixel_type_of(rescale_factor)} (rescale_factor "
            f"{rescale_factor:.6g}): its image_mean and image_std do not describe them. Convert the images to "
            f"{pixel_type_of(saved_scale)}, or, to continue pretraining, give --image_mean and --image_std for them."
        )
    fields = {**processor_kwargs, "do_convert_rgb": convert_rgb, "rescale_factor": rescale_factor, **normalisation}
    if not convert_rgb and not {"image_mean", "image_std"} <= set(normalisation):
        statistics = channel_statistics(train, image_column, config.num_channels, rescale_factor)
        logger.info(
            "Normalising with the training images' own statistics: %s. To skip this pass next time, pass "
            "--image_mean %s --image_std %s.", statistics.describe(),
            " ".join(f"{m:.6g}" for m in statistics.mean), " ".join(f"{s:.6g}" for s in statistics.std),
        )
        fields.update(image_mean=statistics.mean, image_std=statistics.std)
    return SimMIMImageProcessor.from_model_config(config, **fields)


def load_pretraining_model(model_args, train=None, image_column=None):
    """`(SimMIMForMaskedImageModeling, SimMIMImageProcessor)` from a checkpoint, a config file or a preset, with
    the model flags applied (`model_config_overrides`); `--model_revision` and `--token` reach the hub. The
    processor reads the images of `train` (`data_image_processor`; None: RGB photos)."""
    sources = [s for s in (model_args.model_name_or_path, model_args.preset, model_args.config_file) if s]
    if len(sources) > 1:
        raise ValueError("Give only one of --model_name_or_path, --preset and --config_file.")
    overrides = model_config_overrides(model_args)
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    if model_args.model_name_or_path:
        checkpoint_config = SimMIMConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
        check_model_flags(checkpoint_config, model_args, overrides)
        model = SimMIMForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, **hub_kwargs, **overrides)
    else:
        if model_args.config_file:
            config_dict = SimMIMConfig.get_config_dict(model_args.config_file, **hub_kwargs)[0]
            config_dict.pop("encoder_stride", None)  # derived from the patch size and stages, which may be overridden
            config = SimMIMConfig.from_dict({**config_dict, **overrides})
        else:
            config = SimMIMConfig.from_preset(model_args.preset or DEFAULT_PRESET, **overrides)
        check_model_flags(config, model_args, overrides)
        model = SimMIMForMaskedImageModeling(config)
    return model, load_image_processor(model_args, model.config, hub_kwargs, train, image_column)


def skipped_image_counts(train_dataset, eval_dataset=None, trainer=None):
    """`{"train_skipped_images": n, "eval_skipped_images": m}`: the distinct images of each `SeededImageDataset`
    that could not be decoded (and were skipped): found by the header check or by a read so far; of a
    `StreamingImageDataset`, found by the reads of this run so far. With a `trainer`, counted over all its
    processes: then call it on every process."""

    def count(dataset):
        if dataset is None:
            return 0
        if isinstance(dataset, StreamingImageDataset):
            digests = dataset.skipped.digests()
            if trainer is not None:
                digests = set().union(*gather_object([digests]))
            return len(digests)
        return count_unreadable_images(trainer, dataset) if trainer is not None else int(dataset.unreadable_mask.sum())

    return {"train_skipped_images": count(train_dataset), "eval_skipped_images": count(eval_dataset)}
