"""The steps of a pretraining run (`examples/run_mim.py`) that are not one library call: the datasets it trains
and evaluates on, the trainer with its callbacks, and what it writes when training ends."""

import functools
import logging
import os
from typing import NamedTuple

import torch

from ..data.checks import check_image_dataset, check_not_empty
from ..data.device_augmentation import DeviceAugmentation, device_augmentation_problem
from ..data.streaming import StreamingImageDataset, stream_head
from ..data.transforms import SeededImageDataset, SimMIMTransform, collate_fn
from ..reporting.model_card import write_model_card
from ..reporting.pictures import save_loss_curve
from .callbacks import (
    EpochCallback,
    ReconstructionCallback,
    StreamResumeCallback,
    ThroughputCallback,
    add_callback_first,
    check_stream_layout,
    tensorboard_writer,
)
from .recipes import RECIPES
from .runs import describe_data, skipped_image_counts
from .trainer import SimMIMTrainer

logger = logging.getLogger(__name__)

STREAM_HEAD_SIZE = 256  # first images of a stream read before training: checked, and deciding how images are read


class Stream(NamedTuple):
    """A streamed training set (`--streaming`): its first images (`data.streaming.stream_head`), the shuffle buffer,
    this process and the number of processes."""

    head: object
    buffer_size: int
    rank: int
    world_size: int


def streamed(train, data_args, training_args):
    """The `Stream` of a streamed `train` (`datasets.IterableDataset`); its first `STREAM_HEAD_SIZE` images decide
    how images are read (`load_pretraining_model`) and are checked before training."""
    head = stream_head(train, STREAM_HEAD_SIZE)
    check_not_empty(head, "train")
    logger.info(
        "Streaming %d shard(s) over %d process(es), shuffle buffer %d; the first %d images decide how images are read "
        "(and, for images that are not RGB photos, their normalisation unless --image_mean / --image_std are given).",
        train.num_shards, training_args.world_size, data_args.shuffle_buffer_size, len(head),
    )
    return Stream(head, data_args.shuffle_buffer_size, training_args.process_index, training_args.world_size)


def pretraining_datasets(train, validation, processor, augmentation, image_column, seed, eval_mask_seed,
                         mask_column=None, stream=None, augmentation_device="cpu", device="cpu"):
    """`(train, eval)` `SeededImageDataset`s, after reading every image's header (`check_image_dataset`): images
    smaller than a masked square, of another channel count or pixel type than the processor reads, or whose user
    mask (`mask_column`) is missing or of another size are refused, and those whose header cannot be read are
    reported once and left out. Training rows of RGB photos are uint8 (the trainer normalises them on the device: 4x
    less to copy from the DataLoader workers), cropped on the CPU or, as `augmentation_device` and `device` (where
    the model trains) decide (`crops_on_device`), uncropped with their crop box and flip for the device to crop;
    evaluation rows are centre crops with masks fixed by `eval_mask_seed` (or their user masks). `eval` is None
    without validation images.

    With a `stream` (`streamed`), `train` is served by a `StreamingImageDataset`, and only the stream's first images
    are checked before training; the others are read as training goes."""
    checked, sizes = (stream.head if stream is not None else train), {}
    train_unreadable = check_image_dataset(
        checked, image_column, processor.mask_patch_size, "train", processor, mask_column, report=stream is None,
        sizes=sizes,
    )
    device_crop = crops_on_device(augmentation_device, sizes, processor, augmentation, mask_column, stream, device)
    train_transform = SimMIMTransform(
        processor, train=True, image_column=image_column, keep_columns=(), uint8=True, augmentation=augmentation,
        mask_column=mask_column, device_crop=device_crop,
    )
    if stream is not None:
        train_dataset = StreamingImageDataset(
            train, train_transform, seed, stream.buffer_size, stream.rank, stream.world_size
        )
    else:
        train_dataset = SeededImageDataset(train, train_transform, seed=seed, unreadable_rows=train_unreadable)
    if validation is None:
        return train_dataset, None
    validation_unreadable = check_image_dataset(
        validation, image_column, processor.mask_patch_size, "validation", processor, mask_column
    )
    eval_dataset = SeededImageDataset(
        validation, evaluation_transform(processor, image_column, mask_column), seed=eval_mask_seed,
        split="validation", unreadable_rows=validation_unreadable,
    )
    return train_dataset, eval_dataset


def crops_on_device(requested, sizes, processor, augmentation, mask_column=None, stream=None, device="cpu"):
    """Whether the training crop and flip run on the device the model trains on (`--augmentation_device`), for
    training images of `sizes` (`check_image_dataset(..., sizes=)`: `{(width, height): first row's location}`):
    - "cpu": never;
    - "accelerator": always, refusing (naming the fix) what the device path cannot do: a streamed training set,
      images that are not all of one size, images that are not RGB photos, user masks,
      or an augmentation other than the resized crop and flip;
    - "auto": when the model trains on a CUDA GPU and the device path can take the images, and they are at most
      twice the model's size: then the CPU path would decode them in full too (it decodes a JPEG at reduced scale
      only for a crop of at least twice the model's size), so moving the resize to the device only takes work off
      the DataLoader workers."""
    device_type = torch.device(device).type
    if requested == "cpu" or (requested == "auto" and device_type != "cuda"):
        return False
    problem = device_augmentation_problem(augmentation, processor.converts_to_rgb, mask_column)
    if problem is None and device_type == "mps":
        problem = "Apple's MPS devices have no float64, in which the device resize builds its weights"
    if problem is None and stream is not None:
        problem = "a streamed training set is read as training goes, so its image sizes are not known before"
    if problem is None and len(sizes) > 1:
        problem = "the training images are not all of one size (" + ", ".join(
            f"{where} is {width}x{height} px" for (width, height), where in sizes.items()
        ) + "): resize them to one size first"
    if requested == "accelerator" and problem:
        raise ValueError(
            f"--augmentation_device accelerator cannot crop these training images on the device: {problem}. Use "
            "--augmentation_device cpu."
        )
    on_device = requested == "accelerator" or (
        not problem and bool(sizes) and max(*next(iter(sizes))) <= 2 * augmentation.image_size
    )
    logger.info("Training crops and flips run on the %s.", "device of the batch" if on_device else "CPU")
    return on_device


def evaluation_transform(processor, image_column, mask_column=None):
    """Evaluation rows: the image processor's centre crop and a mask (fixed by the dataset's seed, or the row's
    user mask)."""
    return SimMIMTransform(processor, train=False, image_column=image_column, keep_columns=(), mask_column=mask_column)


def pictures_dataset(datasets, processor, mask_seed, stream=None):
    """The rows the reconstruction pictures show: the evaluation dataset of `datasets` (`(train, eval)`), else the
    training rows as evaluation rows (centre crops, masks fixed by `mask_seed` or their user masks), still reported
    as "train" rows and sharing the training flags, so that a bad image is reported and counted once; with a
    `stream`, its first images."""
    train_dataset, eval_dataset = datasets
    if eval_dataset is not None:
        return eval_dataset
    columns = train_dataset.transform.image_column, train_dataset.transform.mask_column
    transform = evaluation_transform(processor, *columns)
    if stream is not None:
        return SeededImageDataset(stream.head, transform, mask_seed)
    return train_dataset.with_transform(transform, mask_seed)


def pretraining_run_info(args, datasets, image_column, lr_rule, augmentation, processor=None):
    """What the model card says of the run. `args`: `(model_args, data_args, recipe_args)`; `datasets`:
    `(train, validation)` as loaded; `processor`: how the images are read."""
    model_args, data_args, recipe_args = args
    hub_dataset = data_args.dataset_name and not os.path.exists(data_args.dataset_name)
    return {
        "data_description": describe_data(data_args, *datasets, image_column, processor),
        "learning_rate_rule": lr_rule,
        "license": recipe_args.model_card_license,
        "recipe": recipe_args.recipe and RECIPES[recipe_args.recipe].describe(),
        "datasets": [data_args.dataset_name] if hub_dataset else None,
        "base_model": model_args.model_name_or_path,
        "augmentation": augmentation,
    }


class StreamingSimMIMTrainer(SimMIMTrainer):
    """`SimMIMTrainer` whose training batches come from a `StreamingImageDataset`: they are this process's share
    already (`split_dataset_by_node`), so their DataLoader is not handed to accelerate, which would split them again
    (`IterableDatasetShard`) or read every batch on the main process and send each process a slice
    (`dispatch_batches`). The Trainer moves each batch to the device (`_prepare_inputs`)."""

    def get_train_dataloader(self):
        args = self.args
        return self.train_dataset.dataloader(
            self._train_batch_size, self.data_collator, num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory, prefetch_factor=args.dataloader_prefetch_factor,
            multiprocessing_context=args.dataloader_multiprocessing_context,
        )


def pretraining_trainer(model, processor, training_args, datasets, recipe, run_info, resume_from=None):
    """`SimMIMTrainer` with images/s in the logs and the epoch that seeds crops and masks; for a streamed training set
    (`StreamingImageDataset`), `StreamingSimMIMTrainer` with exact resumption from `resume_from`
    (`StreamResumeCallback`: the stream replays what the checkpoint trained on, unless `--ignore_data_skip`)."""
    train_dataset, eval_dataset = datasets
    streaming = isinstance(train_dataset, StreamingImageDataset)
    if streaming:
        replay = not training_args.ignore_data_skip
        training_args.ignore_data_skip = True  # the Trainer's own skipping would decode and augment every image
        layout = stream_layout(training_args, train_dataset)
        if resume_from is not None and replay:
            check_stream_layout(resume_from, layout)
    device_crop = getattr(train_dataset.transform, "device_crop", False)
    trainer = (StreamingSimMIMTrainer if streaming else SimMIMTrainer)(
        device_transform=DeviceAugmentation(train_dataset.transform.augmentation) if device_crop else None,
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        processing_class=processor,
        recipe=recipe,
        model_card_writer=functools.partial(write_model_card, run_info=run_info),
    )
    add_callback_first(trainer, ThroughputCallback())
    if streaming:
        trainer.add_callback(StreamResumeCallback(train_dataset, layout, replay))
    else:
        trainer.add_callback(EpochCallback(train_dataset))
    return trainer


def stream_layout(training_args, dataset):
    """The settings that, with the data and the seed, decide which samples a streamed run trains on at each step: a
    run resumed from a checkpoint must have the checkpoint's (`check_stream_layout`)."""
    return {
        "num_shards": dataset.num_shards,
        "processes": training_args.world_size,
        "dataloader_num_workers": training_args.dataloader_num_workers,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "seed": dataset.seed,
        "shuffle_buffer_size": dataset.buffer_size,
    }


def add_reconstruction_pictures(trainer, pictures_dataset, num_images, display_channels=None):
    """Draw the reconstruction of the first `num_images` rows of `pictures_dataset` (an evaluation
    `SeededImageDataset`) at each evaluation and at the end, showing `display_channels`
    (`reporting.pictures.display_view`); None when `num_images` is 0."""
    if num_images <= 0:
        return None
    pictures = ReconstructionCallback.from_dataset(
        pictures_dataset, num_images, trainer.processing_class, writer=lambda: tensorboard_writer(trainer),
        display_channels=display_channels,
    )
    trainer.add_callback(pictures)
    return pictures


def finish_pretraining(trainer, result, datasets, run_info):
    """After `trainer.train()`: save the model and state, evaluate the final model (unless that just happened),
    count the images skipped in each split, save the metrics (`all_results.json`), the loss curve and the model
    card, and push to the hub when asked. Returns `(skipped counts, loss curve path or None)`."""
    train_dataset, eval_dataset = datasets
    trainer.save_model()  # model.safetensors, config.json, preprocessor_config.json
    trainer.save_state()
    if eval_dataset is not None and trainer.args.eval_strategy != "no":
        history = trainer.state.log_history
        if not any(e.get("step") == trainer.state.global_step and "eval_loss" in e for e in history):
            trainer.evaluate()
        metrics = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
        trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
    skipped = run_info["skipped_images"] = skipped_image_counts(train_dataset, eval_dataset, trainer)
    trainer.log_metrics("train", {**result.metrics, **skipped})
    trainer.save_metrics("train", {**result.metrics, **skipped})  # train_results.json and all_results.json
    loss_curve_path = None
    if trainer.is_world_process_zero():
        path = os.path.join(trainer.args.output_dir, "loss_curve.png")
        loss_curve_path = save_loss_curve(trainer.state.log_history, path)
    trainer.create_model_card()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="SimMIM pretraining")
    return skipped, loss_curve_path
