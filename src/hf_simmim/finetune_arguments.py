"""What a fine-tuning / evaluation run is asked to do: the arguments of `examples/run_finetune.py` (model, data,
recipe, and `transformers.TrainingArguments` with the official fine-tuning defaults), parsed with
`HfArgumentParser`. Flags given on the command line always win over these defaults."""

import os
from dataclasses import dataclass, field

from PIL import Image
from transformers import HfArgumentParser, TrainingArguments

from .arguments import parse_with_defaults, simmim_training_defaults
from .augmentation import parse_rand_augment

MODES = ("finetune", "linear_probe", "knn")
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "simmim-finetuning")
# Official layer-wise decay: 0.65 ViT-B, 0.9 Swin-B (100-epoch pretraining), 0.8 Swin-B 800 ep, 0.7 Swin-L.
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9}


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
    mode: str = field(default="finetune", metadata={"help": f"One of {MODES}."})
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth while fine-tuning (official 0.1)."})
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
            "help": "Layer-wise lr decay (default: 0.65 ViT, 0.9 Swin, as the official configs; 1.0, i.e. none, "
            "with --from_scratch, so the baseline's lower layers train at the full rate)."
        },
    )
    probe_block: int | None = field(
        default=None, metadata={"help": "linear_probe / knn: features after this many blocks (ViT) or stages (Swin); default the last."}
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
        default=10.0, metadata={"help": "Share of train held out when the data has no evaluation split."}
    )
    samples_per_class: int | None = field(
        default=None, metadata={"help": "Low-label runs: keep this many training images per class (seeded)."}
    )
    label_fraction: float | None = field(
        default=None, metadata={"help": "Low-label runs: keep this fraction of each class's training images (seeded)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})
    eval_crop_pct: float = field(
        default=1.0, metadata={"help": "Evaluation: resize to size/crop_pct, centre crop (0.875 = 256/224 as ImageNet)."}
    )


@dataclass
class FineTuneRecipeArguments:
    """The official fine-tuning recipe beyond `TrainingArguments`."""

    base_learning_rate: float = field(
        default=1.25e-3, metadata={"help": "lr = base_learning_rate * total batch / 512 (unless --learning_rate)."}
    )
    warmup_learning_rate: float = field(default=2.5e-7, metadata={"help": "Warmup start, scaled like the lr."})
    min_learning_rate: float = field(default=2.5e-7, metadata={"help": "Cosine end, scaled like the lr."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 turns mixup off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 turns cutmix off)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of cutmix when both are on."})
    label_smoothing: float = field(default=0.1, metadata={"help": "Label smoothing (inside the mixed targets)."})
    rand_augment: str = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "RandAugment policy in timm's notation (official 'rand-m9-mstd0.5-inc1'); 'none' turns it off."},
    )
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability (official 0.25; 0 off)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a previous run in --output_dir."})


def finetune_training_defaults():
    """`TrainingArguments` defaults of a fine-tuning run: the pretraining ones with classification labels."""
    defaults = simmim_training_defaults()
    defaults.update(
        output_dir=DEFAULT_OUTPUT_DIR,
        num_train_epochs=30.0,
        warmup_steps=0.2,  # 20 of 100 epochs
        label_names=["labels"],
        prediction_loss_only=False,
        metric_for_best_model="top1",
        greater_is_better=True,
    )
    return defaults


def parse_finetune_arguments(argv=None):
    """`(model_args, data_args, recipe_args, training_args, given)`; `given` holds the flags set explicitly."""
    parser = HfArgumentParser(
        (FineTuneModelArguments, FineTuneDataArguments, FineTuneRecipeArguments, TrainingArguments)
    )
    parsed, given = parse_with_defaults(parser, finetune_training_defaults(), argv)
    model_args, data_args, recipe_args, training_args = parsed
    training_args.remove_unused_columns = False  # the image column must reach the transform
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


# ---------------------------------------------------------------------------------------------- model
def load_classification_model(model_args, num_labels, id2label=None, eval_crop_pct=1.0):
    """`(SimMIMForImageClassification, SimMIMImageProcessor)`: pretrained encoder + new head, or (with
    `--from_scratch`) the same architecture with fresh weights."""
    from .arguments import _parse_overrides
    from .configuration_simmim import SimMIMConfig
    from .image_processing_simmim import SimMIMImageProcessor
    from .modeling_simmim import SimMIMForImageClassification

    overrides = {"drop_path_rate": model_args.drop_path_rate, **_parse_overrides(model_args.config_overrides)}
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
    labels = {"num_labels": num_labels}
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
            source, cache_dir=model_args.cache_dir, **overrides, **labels
        )
    processor = None
    if source:
        try:
            processor = SimMIMImageProcessor.from_pretrained(source, cache_dir=model_args.cache_dir)
        except OSError:
            processor = None
    if processor is None:
        processor = SimMIMImageProcessor.from_model_config(model.config)
    processor.image_size = model.config.image_size  # fine-tuning may change the resolution
    processor.patch_size = model.config.patch_size
    processor.crop_pct = eval_crop_pct
    processor.train_resample = int(Image.BICUBIC)  # the official fine-tuning crops bicubically (timm)
    return model, processor
