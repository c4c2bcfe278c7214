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

Images are read as the checkpoint's image processor reads them: RGB photos, or (a model of another channel count,
.npy or array data) each image's own channels at full precision, with the checkpoint's normalisation (else the
training images' per-channel mean and std); RandAugment, defined on 8-bit RGB, is left out for those.
"""

import logging
import os
import sys

from hf_simmim.data import detect_image_column, label_names, select_per_class
from hf_simmim.training.arguments import parse_finetune_arguments
from hf_simmim.training.distributed import end_distributed_run
from hf_simmim.training.finetuning import (
    augmentation_for,
    finetuning_datasets,
    finetuning_recipe,
    finetuning_run_info,
    finetuning_trainer,
    finish_finetuning,
    load_classification_model,
    mixup_or_label_smoothing,
    resolve_layer_decay,
)
from hf_simmim.training.probing import evaluate_frozen_encoder, load_frozen_encoder
from hf_simmim.training.recipes import check_recipe_backbone
from hf_simmim.training.runs import load_run_datasets, prepare_output_dir, start_run

logger = logging.getLogger("run_finetune")


def main(argv=None):
    model_args, data_args, recipe_args, training_args, given = parse_finetune_arguments(argv, description=__doc__)
    start_run(training_args)
    resume_from = prepare_output_dir(training_args, recipe_args, model_args, given)

    # ---------------------------------------------------------------- data and model, checked before training
    train_raw, eval_raw = load_run_datasets(data_args, training_args, model_args.cache_dir)
    if eval_raw is None:
        raise ValueError("There is no evaluation split: pass --validation_dir or a --validation_split_percentage > 0.")
    image_column = detect_image_column(train_raw, data_args.image_column_name)
    label_column = data_args.label_column_name
    names = label_names(train_raw, label_column)
    train_raw = select_per_class(
        train_raw, label_column, data_args.samples_per_class, data_args.label_fraction, seed=training_args.seed
    )
    model, processor = load_classification_model(model_args, len(names), dict(enumerate(names)), train_raw, image_column)
    check_recipe_backbone(recipe_args.recipe, model.config)
    augmentation = augmentation_for(processor, recipe_args, given)
    fine_tuning = model_args.mode == "finetune"
    datasets = finetuning_datasets(
        (train_raw, eval_raw), processor, augmentation if fine_tuning else None, image_column, label_column,
        training_args.seed,
    )
    logger.info(
        "%s %s (%s) on %d training images (%d classes), evaluating on %d.", model_args.mode, type(model).__name__,
        "from scratch" if model_args.from_scratch else model_args.model_name_or_path, len(train_raw), len(names),
        len(eval_raw),
    )

    # ---------------------------------------------------------------- frozen encoder: linear probe or k-NN
    if not fine_tuning:
        encoder = load_frozen_encoder(model_args, model)
        results = evaluate_frozen_encoder(model_args, training_args, encoder, datasets, len(names))
        if training_args.process_index == 0:
            print_summary(model_args, results, training_args.output_dir)
        return 0

    # ---------------------------------------------------------------- fine-tuning: recipe, trainer, train
    recipe = finetuning_recipe(training_args, recipe_args, given)
    layer_decay = resolve_layer_decay(model_args, model.config.backbone)
    mixup = mixup_or_label_smoothing(recipe_args, training_args, len(names))
    run_info = finetuning_run_info(model_args, recipe_args, (train_raw, eval_raw), names, layer_decay, augmentation)
    trainer = finetuning_trainer(model, processor, training_args, datasets, recipe, run_info, layer_decay, mixup)
    result = trainer.train(resume_from_checkpoint=resume_from)
    results = finish_finetuning(trainer, result, datasets, run_info)
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
    exit_code = main()
    end_distributed_run()  # once main's objects are gone
    sys.exit(exit_code)
