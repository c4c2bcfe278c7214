#!/usr/bin/env python
r"""SimMIM pretraining in one command, on `transformers.Trainer`.

    python examples/run_mim.py                                   # tiny model, bundled sample, ~35 s on 2 CPUs
    python examples/run_mim.py --recipe simmim-swin-base-100ep --dataset_name path/or/hub-name \
        --per_device_train_batch_size 128 --output_dir outputs/swin-b     # an official configuration
    torchrun --nproc_per_node 8 examples/run_mim.py ...           # or: accelerate launch [--config_file ...] ...
    python examples/run_mim.py --resume_from_checkpoint last     # continue an interrupted run
    python examples/run_mim.py args.json                          # the same flags as one JSON object

Model: --preset NAME | --config_file config.json | --model_name_or_path CHECKPOINT (continue pretraining).
Data: --dataset_name (hub name or local path) | --train_dir [--validation_dir] (image folder, folder of .npy
files, Parquet, Arrow or WebDataset .tar shards) | nothing (the sample bundled with hf_simmim). --image_column_name
if it cannot be detected. --streaming --max_steps N reads the training images as a stream (shards split across
processes, shuffled with --shuffle_buffer_size, resumed exactly); `hf-simmim shard DIR OUT` writes a folder as
Parquet shards. Photos are read as RGB; --num_channels N (1 for grayscale / 16-bit, N for multispectral) keeps each
image's own channels at full precision, normalised with the training images' per-channel mean and std (computed in a
first pass unless --image_mean / --image_std are given). --mask_column NAME: masks from the data (--mask_strategy
user). --display_channels R G B: the channels the pictures show.
Recipe: --recipe NAME (an official configuration: hf_simmim.training.recipes), else the official defaults:
AdamW (0.9, 0.999), weight decay 0.05 on the parameters the official code decays, lr = --base_learning_rate x
total batch / 512, warmup from --warmup_learning_rate then cosine to --min_learning_rate (--lr_schedule multistep
for the 800-epoch configs), clipping 5.0, bf16 on GPUs that have it. Every `TrainingArguments` flag works (see
--help).

Writes to --output_dir: the model (safetensors + config), its image processor, README.md (model card),
reconstruction.png (+ reconstructions/ per evaluation), loss_curve.png, checkpoint-*/ and TensorBoard logs.
"""

import logging
import os
import sys

from hf_simmim.data import detect_image_column, pretraining_augmentation
from hf_simmim.reporting.pictures import display_view
from hf_simmim.training.arguments import parse_run_arguments
from hf_simmim.training.distributed import end_distributed_run
from hf_simmim.training.pretraining import (
    add_reconstruction_pictures,
    finish_pretraining,
    pictures_dataset,
    pretraining_datasets,
    pretraining_run_info,
    pretraining_trainer,
    streamed,
)
from hf_simmim.training.runs import (
    apply_learning_rate,
    load_pretraining_model,
    load_run_datasets,
    prepare_output_dir,
    resolve_recipe_defaults,
    start_run,
)
from hf_simmim.training.optim import total_train_batch_size
from hf_simmim.training.recipes import check_recipe_backbone
from hf_simmim.training.trainer import NonFiniteLossError

logger = logging.getLogger("run_mim")


def main(argv=None):
    model_args, data_args, recipe_args, training_args, given = parse_run_arguments(argv, description=__doc__)
    start_run(training_args)
    resume_from = prepare_output_dir(training_args, recipe_args, model_args, given)

    # ---------------------------------------------------------------- data and model, checked before training
    train_raw, eval_raw = load_run_datasets(data_args, training_args, model_args.cache_dir, model_args.token)
    stream = streamed(train_raw, data_args, training_args) if data_args.streaming else None
    first_rows = stream.head if stream else train_raw
    image_column = detect_image_column(first_rows, data_args.image_column_name)
    # the images decide how they are read (RGB photos, or their own channels) and, when not RGB, the normalisation
    model, image_processor = load_pretraining_model(model_args, first_rows, image_column)
    check_recipe_backbone(recipe_args.recipe, model.config)
    display_view(model.config.num_channels, data_args.display_channels)
    augmentation = pretraining_augmentation(model.config.image_size)
    datasets = pretraining_datasets(
        train_raw, eval_raw, image_processor, augmentation, image_column, training_args.seed, data_args.eval_mask_seed,
        data_args.mask_column, stream, data_args.augmentation_device, training_args.device,
    )
    if datasets[1] is None:
        training_args.eval_strategy = "no"
    # the pictures show validation images, else training images, centre-cropped with fixed masks
    pictures_source = pictures_dataset(datasets, image_processor, data_args.eval_mask_seed, stream)

    # ---------------------------------------------------------------- recipe and trainer
    resolve_recipe_defaults(recipe_args, model_args)
    recipe, lr_rule = apply_learning_rate(training_args, recipe_args, given)
    run_info = pretraining_run_info(
        (model_args, data_args, recipe_args), (train_raw, eval_raw), image_column, lr_rule, augmentation,
        image_processor,
    )
    trainer = pretraining_trainer(model, image_processor, training_args, datasets, recipe, run_info, resume_from)
    pictures = add_reconstruction_pictures(
        trainer, pictures_source, data_args.num_reconstruction_images, data_args.display_channels
    )
    logger.info(
        "Pretraining %s (%s parameters) on %s. Learning rate %.3g (%s), total batch %d.",
        type(model).__name__, f"{model.num_parameters():,}", run_info["data_description"],
        training_args.learning_rate, lr_rule, total_train_batch_size(training_args),
    )

    # ---------------------------------------------------------------- train, then save and report
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    skipped, loss_curve_path = finish_pretraining(trainer, result, datasets, run_info)
    if trainer.is_world_process_zero():
        print_summary(trainer, pictures, loss_curve_path, skipped)
    return 0


def print_summary(trainer, pictures, loss_curve_path, skipped):
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    output_dir = os.path.abspath(trainer.args.output_dir)
    lines = [
        "",
        "=" * 78,
        f"SimMIM pretraining done: {trainer.state.global_step} steps, {trainer.state.epoch:.1f} epochs.",
        f"  training loss    {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)" if losses else "",
        f"  evaluation loss  {eval_losses[0]:.4f} -> {eval_losses[-1]:.4f}" if eval_losses else "",
        f"  images skipped (cannot be decoded): {skipped['train_skipped_images']} training, "
        f"{skipped['eval_skipped_images']} validation",
        f"  checkpoint       {output_dir}",
        f"  model card       {os.path.join(output_dir, 'README.md')}",
        f"  pictures         {(pictures and pictures.last_path) or '-'}, {loss_curve_path or '-'}",
        "Load it:",
        "  import hf_simmim; from transformers import AutoModel, AutoImageProcessor",
        f"  model = AutoModel.from_pretrained({output_dir!r})",
        "Reconstruct your own images:",
        f"  hf-simmim reconstruct {output_dir} IMAGE... --output grid.png",
        "Fine-tune it for classification:",
        f"  AutoModelForImageClassification.from_pretrained({output_dir!r}, num_labels=N)",
        "Continue pretraining:",
        f"  python examples/run_mim.py --model_name_or_path {output_dir} --output_dir NEW_DIR ...",
        "=" * 78,
    ]
    print("\n".join(line for line in lines if line))


if __name__ == "__main__":
    exit_code = main()
    end_distributed_run()  # once main's objects are gone
    sys.exit(exit_code)
