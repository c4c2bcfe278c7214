#!/usr/bin/env python
"""Fine-tune or evaluate a SimMIM encoder on labelled images, on `transformers.Trainer`.

    python examples/run_finetune.py --model_name_or_path outputs/simmim-pretraining    # bundled CIFAR-10 sample
    python examples/run_finetune.py --model_name_or_path outputs/simmim-pretraining --from_scratch  # baseline
    python examples/run_finetune.py --model_name_or_path CKPT --mode linear_probe --probe_block 8
    python examples/run_finetune.py --model_name_or_path CKPT --mode knn
    python examples/run_finetune.py --model_name_or_path CKPT --dataset_name PATH --samples_per_class 100

Recipe (defaults, the official fine-tuning): AdamW, weight decay 0.05, layer-wise lr decay (0.65 ViT, 0.9 Swin;
embeddings at layer 0, head and final norm at scale 1), lr = --base_learning_rate x total batch / 512, warmup
then cosine, drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, clipping 5.0. Accuracy (top-1, top-5)
through the `evaluate` module shipped with hf_simmim. Writes the model, all_results.json and a model card to
--output_dir.
"""

import functools
import json
import logging
import os
import sys

import numpy as np
import torch

from hf_simmim import SimMIMModel, metrics
from hf_simmim.training.runs import _parse_overrides, load_run_datasets, prepare_output_dir, set_learning_rate, skipped_image_counts, start_run
from hf_simmim.data import finetuning_augmentation
from hf_simmim.data.transforms import SeededImageDataset, SimMIMTransform, collate_fn
from hf_simmim.data.checks import check_image_dataset
from hf_simmim.data.loading import detect_image_column, label_names, select_per_class
from hf_simmim.training.finetuning import load_classification_model
from hf_simmim.training.recipes import DEFAULT_LAYER_DECAY, RECIPES
from hf_simmim.training.arguments import parse_finetune_arguments
from hf_simmim.training.finetuning import MixupCutmix
from hf_simmim.training.trainer import SimMIMFineTuneTrainer
from hf_simmim.reporting.model_card import write_finetuning_card
from hf_simmim.training.probing import extract_features, knn_scores, linear_probe
from hf_simmim.training.schedules import SimMIMRecipe
from hf_simmim.training.callbacks import EpochCallback, ThroughputCallback, add_callback_first

logger = logging.getLogger("run_finetune")


def accuracy_function(num_labels):
    metric = metrics.load("top_k_accuracy")
    ks = (1, 5) if num_labels > 5 else (1,)

    def compute_metrics(eval_prediction):
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        return metric.compute(predictions=logits, references=labels, k=ks)

    return compute_metrics, ks


def run_probe(model_args, training_args, model, train_dataset, eval_dataset, num_labels, compute_ks):
    """Linear probe or k-NN on frozen features; returns the metrics."""
    loader = functools.partial(
        torch.utils.data.DataLoader,
        batch_size=training_args.per_device_eval_batch_size,
        collate_fn=collate_fn,
        num_workers=training_args.dataloader_num_workers,
    )
    device = training_args.device
    model.to(device)
    train_x, train_y = extract_features(model, loader(train_dataset), model_args.probe_block, device)
    test_x, test_y = extract_features(model, loader(eval_dataset), model_args.probe_block, device)
    if model_args.mode == "knn":
        scores = knn_scores(train_x, train_y, test_x, num_labels, model_args.knn_k, model_args.knn_temperature)
    else:
        scores = linear_probe(
            train_x, train_y, test_x, num_labels, epochs=model_args.probe_epochs, lr=model_args.probe_learning_rate,
            seed=training_args.seed,
        )
    result = metrics.load("top_k_accuracy").compute(predictions=scores.numpy(), references=test_y.numpy(), k=compute_ks)
    return {f"eval_{k}": v for k, v in result.items()}


def main(argv=None):
    model_args, data_args, recipe_args, training_args, given = parse_finetune_arguments(argv)
    start_run(training_args)
    resume_from = prepare_output_dir(training_args, recipe_args, model_args, given)

    # ---------------------------------------------------------------- data, checked before anything trains
    train_raw, eval_raw = load_run_datasets(data_args, training_args, model_args.cache_dir)
    if eval_raw is None or len(eval_raw) == 0:
        raise ValueError("There is no evaluation split: pass --validation_dir or a --validation_split_percentage > 0.")
    image_column = detect_image_column(train_raw, data_args.image_column_name)
    label_column = data_args.label_column_name
    names = label_names(train_raw, label_column)
    train_raw = select_per_class(
        train_raw, label_column, data_args.samples_per_class, data_args.label_fraction, seed=training_args.seed
    )

    model, processor = load_classification_model(model_args, len(names), dict(enumerate(names)))
    augmentation = finetuning_augmentation(model.config.image_size, recipe_args.rand_augment, recipe_args.random_erasing)
    train = model_args.mode == "finetune"
    check_image_dataset(train_raw, image_column, augmentation.min_image_size if train else 1, "train")
    check_image_dataset(eval_raw, image_column, 1, "validation")
    layer_decay = model_args.layer_decay
    if layer_decay is None:  # decay protects pretrained lower layers; from scratch there is nothing to protect
        layer_decay = 1.0 if model_args.from_scratch else DEFAULT_LAYER_DECAY[model.config.backbone]
    keep = (label_column,)
    train_transform = SimMIMTransform(
        processor, train=train, image_column=image_column, with_mask=False, keep_columns=keep, augmentation=augmentation
    )
    eval_transform = SimMIMTransform(processor, train=False, image_column=image_column, with_mask=False, keep_columns=keep)
    # crops drawn per (seed, epoch, row), and each image that cannot be decoded reported once and counted
    train_dataset = SeededImageDataset(train_raw, train_transform, seed=training_args.seed)
    eval_dataset = SeededImageDataset(eval_raw, eval_transform, seed=training_args.seed, split="validation")
    compute_metrics, ks = accuracy_function(len(names))
    source = "from scratch" if model_args.from_scratch else f"from {model_args.model_name_or_path}"
    logger.info(
        "%s %s (%s) on %d training images (%d classes), evaluating on %d.",
        model_args.mode, type(model).__name__, source, len(train_raw), len(names), len(eval_raw),
    )

    if model_args.mode != "finetune":
        encoder = model.simmim
        if not model_args.from_scratch:  # the encoder with its final norm, at the resolution the overrides ask for
            encoder = SimMIMModel.from_pretrained(
                model_args.model_name_or_path,
                cache_dir=model_args.cache_dir,
                **_parse_overrides(model_args.config_overrides),
            )
        results = run_probe(model_args, training_args, encoder, train_dataset, eval_dataset, len(names), ks)
        results.update(skipped_image_counts(train_dataset, eval_dataset))
        if training_args.process_index == 0:
            os.makedirs(training_args.output_dir, exist_ok=True)
            with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as handle:
                json.dump(results, handle, indent=2)
            print_summary(model_args, results, training_args.output_dir)
        return 0

    # ---------------------------------------------------------------- recipe, trainer
    scale, _ = set_learning_rate(training_args, recipe_args.base_learning_rate, given)
    recipe = SimMIMRecipe(
        schedule="cosine", warmup_lr=recipe_args.warmup_learning_rate * scale, min_lr=recipe_args.min_learning_rate * scale
    )
    mixup = None
    if recipe_args.mixup > 0 or recipe_args.cutmix > 0:
        mixup = MixupCutmix(
            len(names), recipe_args.mixup, recipe_args.cutmix, recipe_args.mixup_prob, recipe_args.mixup_switch_prob,
            recipe_args.label_smoothing,
            rng=np.random.default_rng([training_args.seed, training_args.process_index]),  # reproducible per --seed
        )
    elif recipe_args.label_smoothing > 0:
        training_args.label_smoothing_factor = recipe_args.label_smoothing
    run_info = {
        "source": source,
        "mode": model_args.mode,
        "layer_decay": layer_decay,
        "recipe": recipe_args.recipe and RECIPES[recipe_args.recipe].describe(),
        "train_images": len(train_raw),
        "eval_images": len(eval_raw),
        "classes": names,
        "base_model": None if model_args.from_scratch else model_args.model_name_or_path,
        "augmentation": augmentation,
    }
    trainer = SimMIMFineTuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        processing_class=processor,
        compute_metrics=compute_metrics,
        recipe=recipe,
        layer_decay=layer_decay,
        mixup=mixup,
        model_card_writer=functools.partial(write_finetuning_card, run_info=run_info),
    )
    add_callback_first(trainer, ThroughputCallback())
    trainer.add_callback(EpochCallback(train_dataset))
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
    trainer.save_state()
    results = {**result.metrics, **trainer.evaluate()}
    results.update(skipped_image_counts(train_dataset, eval_dataset, trainer))
    trainer.save_metrics("all", results, combined=False)
    run_info["results"] = results
    trainer.create_model_card()
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="SimMIM fine-tuning")
    if trainer.is_world_process_zero():
        print_summary(model_args, results, training_args.output_dir)
    return 0


def print_summary(model_args, results, output_dir):
    accuracies = ", ".join(f"{k[5:]} {v:.4f}" for k, v in results.items() if k.startswith("eval_top"))
    print(
        "\n".join(
            [
                "",
                "=" * 78,
                f"SimMIM {model_args.mode} done ({'from scratch' if model_args.from_scratch else model_args.model_name_or_path}).",
                f"  accuracy  {accuracies}",
                f"  images skipped (cannot be decoded): {results['train_skipped_images']} training, "
                f"{results['eval_skipped_images']} validation",
                f"  results   {os.path.join(os.path.abspath(output_dir), 'all_results.json')}",
                "=" * 78,
            ]
        )
    )


if __name__ == "__main__":
    sys.exit(main())
