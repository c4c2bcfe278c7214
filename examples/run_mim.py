#!/usr/bin/env python
"""SimMIM pretraining in one command, on `transformers.Trainer`.

    python examples/run_mim.py                                   # tiny model, bundled sample, ~1 minute on CPU
    python examples/run_mim.py --preset swin-base-window6-192 --dataset_name path/or/hub-name \
        --num_train_epochs 100 --per_device_train_batch_size 128 --output_dir outputs/swin-b
    torchrun --nproc_per_node 8 examples/run_mim.py ...           # or: accelerate launch [--config_file ...] ...
    python examples/run_mim.py --resume_from_checkpoint last     # continue an interrupted run
    python examples/run_mim.py args.json                          # the same flags as one JSON object

Model: --preset NAME | --config_file config.json | --model_name_or_path CHECKPOINT (continue pretraining).
Data: --dataset_name (hub name or local path) | --train_dir [--validation_dir] (image folder, Parquet or Arrow)
| nothing (the sample bundled with hf_simmim). --image_column_name if it cannot be detected.
Recipe (defaults): AdamW (0.9, 0.999), weight decay 0.05 (not on norms, biases, embeddings, tokens, bias
tables), lr = --base_learning_rate x total batch / 512, warmup from --warmup_learning_rate then cosine to
--min_learning_rate (--lr_schedule multistep for the 800-epoch configs), clipping 5.0, bf16 on GPUs that have it.
Every `TrainingArguments` flag works (see --help).

Writes to --output_dir: the model (safetensors + config), its image processor, README.md (model card),
reconstruction.png (+ reconstructions/ per evaluation), loss_curve.png, checkpoint-*/ and TensorBoard logs.
"""

import functools
import logging
import os
import sys

import transformers

from hf_simmim.training.runs import load_run_datasets, start_run, apply_learning_rate, describe_data, load_pretraining_model, prepare_output_dir, resolve_recipe_defaults, skipped_image_counts

from hf_simmim.training.arguments import parse_run_arguments
from hf_simmim.training.recipes import RECIPES
from hf_simmim.data import pretraining_augmentation
from hf_simmim.data.transforms import SeededImageDataset, SimMIMTransform, collate_fn
from hf_simmim.data.checks import check_image_dataset, check_not_empty
from hf_simmim.data.loading import detect_image_column
from hf_simmim.reporting.model_card import write_model_card
from hf_simmim.training.callbacks import EpochCallback, ReconstructionCallback, ThroughputCallback, add_callback_first, tensorboard_writer
from hf_simmim.training.trainer import NonFiniteLossError, SimMIMTrainer
from hf_simmim.training.optim import total_train_batch_size
from hf_simmim.reporting.pictures import save_loss_curve

logger = logging.getLogger("run_mim")


def main(argv=None):
    model_args, data_args, recipe_args, training_args, given = parse_run_arguments(argv)
    start_run(training_args)
    resume_from = prepare_output_dir(training_args, recipe_args, model_args, given)

    # ---------------------------------------------------------------- data, checked before anything trains
    train_raw, eval_raw = load_run_datasets(data_args, training_args, model_args.cache_dir)
    if eval_raw is not None and len(eval_raw) == 0:
        logger.warning("The validation split is empty: training without evaluation.")
        eval_raw = None
    check_not_empty(train_raw, "train")
    image_column = detect_image_column(train_raw, data_args.image_column_name)

    model, image_processor = load_pretraining_model(model_args)
    min_size = model.config.mask_patch_size
    check_image_dataset(train_raw, image_column, min_size, "train")
    if eval_raw is not None:
        check_image_dataset(eval_raw, image_column, min_size, "validation")

    # uint8 batches: the trainer normalises them on the device (4x less to copy from the DataLoader workers)
    augmentation = pretraining_augmentation(model.config.image_size)
    train_transform = SimMIMTransform(
        image_processor, train=True, image_column=image_column, keep_columns=(), uint8=True, augmentation=augmentation
    )
    train_dataset = SeededImageDataset(train_raw, train_transform, seed=training_args.seed)
    eval_dataset = None
    if eval_raw is not None:
        eval_transform = SimMIMTransform(image_processor, train=False, image_column=image_column, keep_columns=())
        eval_dataset = SeededImageDataset(eval_raw, eval_transform, seed=data_args.eval_mask_seed, split="validation")
    else:
        training_args.eval_strategy = transformers.IntervalStrategy.NO

    # ---------------------------------------------------------------- recipe, trainer, callbacks
    resolve_recipe_defaults(recipe_args, model_args)
    recipe, lr_rule = apply_learning_rate(training_args, recipe_args, given)
    run_info = {
        "data_description": describe_data(data_args, train_raw, eval_raw, image_column),
        "learning_rate_rule": lr_rule,
        "license": recipe_args.model_card_license,
        "recipe": recipe_args.recipe and RECIPES[recipe_args.recipe].describe(),
        "datasets": [data_args.dataset_name]
        if data_args.dataset_name and not os.path.exists(data_args.dataset_name)
        else None,
        "base_model": model_args.model_name_or_path,
        "augmentation": augmentation,
    }
    trainer = SimMIMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        processing_class=image_processor,
        recipe=recipe,
        model_card_writer=functools.partial(write_model_card, run_info=run_info),
    )
    add_callback_first(trainer, ThroughputCallback())
    trainer.add_callback(EpochCallback(train_dataset))
    pictures = None
    if data_args.num_reconstruction_images > 0:  # a fixed batch of validation (else training) images
        source = (
            eval_dataset
            if eval_dataset is not None
            else SeededImageDataset(
                train_raw,
                SimMIMTransform(image_processor, train=False, image_column=image_column, keep_columns=()),
                seed=data_args.eval_mask_seed,
            )
        )
        pictures = ReconstructionCallback.from_dataset(
            source, data_args.num_reconstruction_images, image_processor, writer=lambda: tensorboard_writer(trainer)
        )
        trainer.add_callback(pictures)

    logger.info(
        "Pretraining %s (%s parameters) on %s. Learning rate %.3g (%s), total batch %d.",
        type(model).__name__,
        f"{model.num_parameters():,}",
        run_info["data_description"],
        training_args.learning_rate,
        lr_rule,
        total_train_batch_size(training_args),
    )

    # ---------------------------------------------------------------- train
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        return 1
    trainer.save_model()  # model.safetensors, config.json, preprocessor_config.json
    trainer.save_state()

    if eval_dataset is not None and training_args.eval_strategy != transformers.IntervalStrategy.NO:
        evaluated = any(
            e.get("step") == trainer.state.global_step and "eval_loss" in e for e in trainer.state.log_history
        )
        if not evaluated:
            trainer.evaluate()
        metrics = [e for e in trainer.state.log_history if "eval_loss" in e][-1]
        trainer.save_metrics("eval", {k: v for k, v in metrics.items() if k.startswith("eval_")})
    skipped = run_info["skipped_images"] = skipped_image_counts(train_dataset, eval_dataset, trainer)
    trainer.log_metrics("train", {**result.metrics, **skipped})
    trainer.save_metrics("train", {**result.metrics, **skipped})  # train_results.json and all_results.json

    loss_curve_path = None
    if trainer.is_world_process_zero():
        loss_curve_path = save_loss_curve(
            trainer.state.log_history, os.path.join(training_args.output_dir, "loss_curve.png")
        )
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="SimMIM pretraining")

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
    sys.exit(main())
