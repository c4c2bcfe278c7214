"""Fine-tuning specifics of the official recipe: the classification model (pretrained encoder + new head, or the
same architecture from scratch), batch-level mixup / cutmix, and the steps of a fine-tuning run
(`examples/run_finetune.py`) that are not one library call."""

import functools
import logging

import numpy as np
import torch

from .. import metrics
from ..data.augmentation import SMALL_IMAGE_SIZE, finetuning_augmentation
from ..data.checks import check_image_dataset
from ..data.transforms import SeededImageDataset, SimMIMTransform, collate_fn
from ..models.configuration_simmim import SimMIMConfig
from ..models.modeling_simmim import SimMIMForImageClassification
from ..reporting.model_card import write_finetuning_card
from .callbacks import EpochCallback, ThroughputCallback, add_callback_first
from .recipes import DEFAULT_LAYER_DECAY, RECIPES
from .runs import (
    data_image_processor,
    parse_config_overrides,
    saved_normalisation,
    set_learning_rate,
    skipped_image_counts,
)
from .schedules import SimMIMRecipe
from .trainer import SimMIMFineTuneTrainer

logger = logging.getLogger(__name__)


class MixupCutmix:
    """Batch-level mixup (Zhang et al.) / cutmix (Yun et al.) with label smoothing, as timm's `Mixup` used by the
    official fine-tuning: per batch, cutmix with probability `switch_prob` (when both are on), else mixup; the
    batch is mixed with its flip. Labels become soft targets `(B, num_classes)`.
    """

    def __init__(self, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                 label_smoothing=0.1, rng=None):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 (0 turns one off).")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing = label_smoothing
        self.rng = rng if rng is not None else np.random.default_rng()

    def soft_targets(self, labels, lam):
        off = self.label_smoothing / self.num_classes
        on = 1.0 - self.label_smoothing + off
        one_hot = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        one_hot.scatter_(1, labels.view(-1, 1), on)
        return one_hot * lam + one_hot.flip(0) * (1.0 - lam)

    def __call__(self, batch):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        lam = 1.0
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.rng.random() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
            if use_cutmix:
                lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                _, _, h, w = pixel_values.shape
                cut = np.sqrt(1.0 - lam)
                ch, cw = int(h * cut), int(w * cut)
                cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
                y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
                x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
                pixel_values = pixel_values.clone()
                pixel_values[:, :, y0:y1, x0:x1] = pixel_values.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)  # the area actually pasted
            else:
                lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
                pixel_values = pixel_values * lam + pixel_values.flip(0) * (1.0 - lam)
        return {**batch, "pixel_values": pixel_values, "labels": self.soft_targets(labels, lam)}


def load_classification_model(model_args, num_labels, id2label=None, train=None, image_column=None):
    """`(SimMIMForImageClassification, SimMIMImageProcessor)`: pretrained encoder + new head, or (with
    `--from_scratch`) the same architecture with fresh weights; the processor reads the images of `train`
    (`runs.data_image_processor`; None: RGB photos) with the checkpoint's normalisation where it saved one."""
    overrides = {"drop_path_rate": model_args.drop_path_rate, **parse_config_overrides(model_args.config_overrides)}
    set_by_the_data = {"num_labels", "id2label", "label2id", "problem_type"} & set(overrides)
    if set_by_the_data:
        raise ValueError(
            f"--config_overrides sets {', '.join(sorted(set_by_the_data))}, which fine-tuning takes from the labels of "
            "the data (single-label classification): drop it from --config_overrides."
        )
    if model_args.per_block_relative_position_bias and not {
        "use_relative_position_bias", "use_shared_relative_position_bias"
    } & set(overrides):
        base = (
            SimMIMConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
            if model_args.model_name_or_path
            else SimMIMConfig.from_preset(model_args.preset)
        )
        if base.backbone == "vit" and base.use_shared_relative_position_bias:
            overrides.update(use_relative_position_bias=True, use_shared_relative_position_bias=False)
    # one class per image; the mixup / cutmix soft targets are probabilities over those classes, not multi-label
    labels = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    if id2label:
        labels.update(id2label=dict(id2label), label2id={name: i for i, name in id2label.items()})
    source = model_args.model_name_or_path
    if model_args.from_scratch:
        if source:
            config = SimMIMConfig.from_pretrained(source, cache_dir=model_args.cache_dir, **overrides, **labels)
        else:
            config = SimMIMConfig.from_preset(model_args.preset, **overrides, **labels)
        model = SimMIMForImageClassification(config)
    else:
        model = SimMIMForImageClassification.from_pretrained(
            source, cache_dir=model_args.cache_dir, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **overrides, **labels,
        )
    saved = saved_normalisation(source, {"cache_dir": model_args.cache_dir}) if source else {}
    # keep the normalisation the encoder was pretrained with, for the same pixel type (not its resampling:
    # fine-tuning evaluates bicubic)
    normalisation = {key: saved[key] for key in ("image_mean", "image_std", "rescale_factor") if key in saved}
    crop_pct = eval_crop_pct(model.config.image_size)
    return model, data_image_processor(model.config, normalisation, train, image_column, crop_pct=crop_pct)


def augmentation_for(processor, recipe_args, given):
    """The official fine-tuning augmentation at the model's size, without RandAugment for images that are not
    RGB photos (it is defined on 8-bit RGB), unless `--rand_augment` was given, which `SimMIMTransform` then
    refuses with what to do."""
    rand_augment = recipe_args.rand_augment
    if rand_augment and not processor.converts_to_rgb and "rand_augment" not in given:
        logger.info("No RandAugment: it is defined on 8-bit RGB images, and these keep their own channels.")
        rand_augment = None
    return finetuning_augmentation(processor.image_size, rand_augment, recipe_args.random_erasing)


def eval_crop_pct(image_size):
    """The official fine-tuning evaluation (timm): resize to int(256 / 224 x size), centre crop `size`; images of
    32 px or less are only normalised."""
    return 1.0 if image_size <= SMALL_IMAGE_SIZE else 224 / 256


def finetuning_datasets(datasets, processor, augmentation, image_column, label_column, seed):
    """`(train, eval)` `SeededImageDataset`s of labelled images, after reading every image's header
    (`check_image_dataset`: images whose header cannot be read are reported once and left out; both crops take any
    image size). Training rows get `augmentation` (None: the evaluation crop, for frozen-encoder probes); evaluation
    rows the processor's resize and centre crop."""
    train, validation = datasets
    train_unreadable = check_image_dataset(train, image_column, 1, "train", processor)
    validation_unreadable = check_image_dataset(validation, image_column, 1, "validation", processor)
    keep = (label_column,)
    train_transform = SimMIMTransform(
        processor, train=augmentation is not None, image_column=image_column, with_mask=False, keep_columns=keep,
        augmentation=augmentation,
    )
    eval_transform = SimMIMTransform(processor, train=False, image_column=image_column, with_mask=False, keep_columns=keep)
    return (
        SeededImageDataset(train, train_transform, seed=seed, unreadable_rows=train_unreadable),
        SeededImageDataset(
            validation, eval_transform, seed=seed, split="validation", unreadable_rows=validation_unreadable
        ),
    )


def finetuning_recipe(training_args, recipe_args, given):
    """Set the learning rate by the scaling rule (unless `--learning_rate` was given); the schedule is warmup +
    cosine with warmup and minimum learning rates scaled alike, as the official fine-tuning."""
    scale, _ = set_learning_rate(training_args, recipe_args.base_learning_rate, given)
    return SimMIMRecipe(
        schedule="cosine",
        warmup_lr=recipe_args.warmup_learning_rate * scale,
        min_lr=recipe_args.min_learning_rate * scale,
        warmup_prefix=recipe_args.warmup_prefix,
        no_weight_decay_names=recipe_args.no_weight_decay_names,
    )


def resolve_layer_decay(model_args, backbone):
    """`--layer_decay`, else the official value for the backbone; 1.0 (none) from scratch, where there are no
    pretrained lower layers to protect."""
    if model_args.layer_decay is not None:
        return model_args.layer_decay
    return 1.0 if model_args.from_scratch else DEFAULT_LAYER_DECAY[backbone]


def mixup_or_label_smoothing(recipe_args, training_args, num_classes):
    """The official mixup / cutmix (label smoothing inside the mixed targets), or, with both off, the Trainer's
    label smoothing. Seeded by `--seed` and the process, so a run is reproducible."""
    if recipe_args.mixup <= 0 and recipe_args.cutmix <= 0:
        training_args.label_smoothing_factor = recipe_args.label_smoothing
        return None
    return MixupCutmix(
        num_classes, recipe_args.mixup, recipe_args.cutmix, recipe_args.mixup_prob, recipe_args.mixup_switch_prob,
        recipe_args.label_smoothing, rng=np.random.default_rng([training_args.seed, training_args.process_index]),
    )


def finetuning_run_info(model_args, recipe_args, datasets, class_names, layer_decay, augmentation):
    """What the model card says of the run."""
    return {
        "source": "from scratch" if model_args.from_scratch else f"from {model_args.model_name_or_path}",
        "mode": model_args.mode,
        "layer_decay": layer_decay,
        "recipe": recipe_args.recipe and RECIPES[recipe_args.recipe].describe(),
        "train_images": len(datasets[0]),
        "eval_images": len(datasets[1]),
        "classes": class_names,
        "base_model": None if model_args.from_scratch else model_args.model_name_or_path,
        "augmentation": augmentation,
    }


def accuracy_ks(num_classes):
    """The top-k accuracies a run reports: top-1, and top-5 with more than 5 classes."""
    return (1, 5) if num_classes > 5 else (1,)


def accuracy_metrics(num_classes):
    """`compute_metrics` for the Trainer: top-k accuracies from the `evaluate` module shipped with hf_simmim."""
    metric, ks = metrics.load("top_k_accuracy"), accuracy_ks(num_classes)

    def compute_metrics(eval_prediction):
        return metric.compute(predictions=eval_prediction.predictions, references=eval_prediction.label_ids, k=ks)

    return compute_metrics


def finetuning_trainer(model, processor, training_args, datasets, recipe, run_info, layer_decay, mixup):
    """`SimMIMFineTuneTrainer` with accuracy metrics, images/s in the logs and the epoch that seeds crops."""
    compute_metrics = accuracy_metrics(len(run_info["classes"]))
    trainer = SimMIMFineTuneTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        data_collator=collate_fn,
        processing_class=processor,
        compute_metrics=compute_metrics,
        recipe=recipe,
        layer_decay=layer_decay,
        mixup=mixup,
        model_card_writer=functools.partial(write_finetuning_card, run_info=run_info),
    )
    add_callback_first(trainer, ThroughputCallback())
    trainer.add_callback(EpochCallback(datasets[0]))
    return trainer


def finish_finetuning(trainer, result, datasets, run_info):
    """After `trainer.train()`: save the model and state, evaluate, count the images skipped in each split, save
    `all_results.json` and the model card, push to the hub when asked. Returns the results."""
    trainer.save_model()
    trainer.save_state()
    results = {**result.metrics, **trainer.evaluate(), **skipped_image_counts(*datasets, trainer)}
    trainer.save_metrics("all", results, combined=False)
    run_info["results"] = results
    trainer.create_model_card()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="SimMIM fine-tuning")
    return results
