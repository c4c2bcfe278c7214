"""A SimMIM encoder as the image tower of a CLIP-style text-image model (`examples/run_clip.py`): captions made
from class labels, a tokenizer trained on them, a tiny BERT text tower, transformers' `VisionTextDualEncoderModel`
trained with its contrastive loss on `Trainer`, and zero-shot accuracy through transformers'
`zero-shot-image-classification` pipeline.

The vision tower is our `SimMIMModel`: `VisionTextDualEncoderModel` reads its `pooler_output` (the mean of the
final patch tokens) and projects `vision_config.hidden_size` features, which `SimMIMConfig` gives for both
backbones (Swin: the last stage's width, `embed_dim * 2 ** (stages - 1)`).
"""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    BertConfig,
    BertModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    pipeline,
)
from transformers.trainer_utils import set_seed

from .. import metrics
from ..data.augmentation import finetuning_augmentation
from ..data.image_ops import UndecodableImage, decode_image, report_skipped_image
from ..data.loading import detect_image_column, label_names, undecoded
from ..data.transforms import collate_fn
from ..models.configuration_simmim import SimMIMConfig
from ..models.modeling_simmim import SimMIMModel
from .arguments import DEFAULT_OUTPUT_DIR, accelerator_available, argument_parser
from .callbacks import EpochCallback
from .distributed import single_process_environment
from .finetuning import accuracy_ks, finetuning_datasets
from .runs import check_rgb_model

logger = logging.getLogger(__name__)

CONTRASTIVE_OUTPUT_DIR = os.path.join("outputs", "simmim-clip")
TOWERS = ("simmim", "random")  # the SimMIM-pretrained vision tower, and the same architecture freshly initialised
SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}


@dataclass
class ContrastiveModelArguments:
    """The towers: a SimMIM checkpoint for images, a small BERT from config for text, and their projection."""

    vision_model_name_or_path: str = field(
        default=DEFAULT_OUTPUT_DIR,
        metadata={"help": "SimMIM checkpoint of the image tower (a run_mim.py output folder or a hub id). The "
                  "default folder, when missing, is made first by `python examples/run_mim.py`."},
    )
    projection_dim: int = field(default=64, metadata={"help": "Width of the shared image-text embedding."})
    text_hidden_size: int = field(default=64, metadata={"help": "Width of the BERT text tower."})
    text_num_hidden_layers: int = field(default=2, metadata={"help": "Blocks of the BERT text tower."})
    text_num_attention_heads: int = field(default=2, metadata={"help": "Attention heads of the BERT text tower."})
    skip_random_tower: bool = field(
        default=False,
        metadata={"help": "Train only the SimMIM-pretrained vision tower, not also the same run from a randomly "
                  "initialised one (the baseline)."},
    )


@dataclass
class ContrastiveDataArguments:
    """Labelled images, captioned from their labels: a hub dataset, a local folder of class subfolders,
    Parquet/Arrow files, or (nothing given) the CIFAR-10 sample bundled with the package."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the hub, or a local path."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images: image folder or Parquet/Arrow."})
    validation_dir: str | None = field(default=None, metadata={"help": "Held-out images for zero-shot accuracy."})
    image_column_name: str | None = field(default=None, metadata={"help": "Column of images (default: detected)."})
    label_column_name: str = field(default="label", metadata={"help": "Column of integer class labels."})
    caption_template: str = field(
        default="a photo of a {}.",
        metadata={"help": "Caption of an image, {} standing for its class name; also the zero-shot prompt."},
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Percentage of train held out when the data has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Zero-shot on the first N held-out images."})


def contrastive_training_defaults():
    """`TrainingArguments` defaults of the example (flags given on the command line override them): a few
    minutes on 2 CPUs for both towers with the tiny SimMIM model."""
    return {
        "output_dir": CONTRASTIVE_OUTPUT_DIR,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 15.0,
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 0.1,
        "lr_scheduler_type": "cosine",
        "logging_steps": 0.1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": not accelerator_available(),
        "remove_unused_columns": False,  # the image and label columns must reach the transform
    }


def parse_contrastive_arguments(argv=None, description=None):
    """`(model_args, data_args, training_args)` from `argv` (a list like `sys.argv[1:]`, or one `.json` file of
    the same flags); a caption template without exactly one `{}` is refused."""
    parser = argument_parser((ContrastiveModelArguments, ContrastiveDataArguments, TrainingArguments), description)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as handle:
            parsed = parser.parse_dict({**contrastive_training_defaults(), **json.load(handle)})
    else:
        parser.set_defaults(**contrastive_training_defaults())
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, training_args = parsed
    if data_args.caption_template.count("{}") != 1:
        raise ValueError(
            f"--caption_template {data_args.caption_template!r} must hold exactly one {{}}, where the class name "
            "goes (e.g. 'a photo of a {}.')."
        )
    return model_args, data_args, training_args


def ensure_checkpoint(path, is_default, pretraining_command, training_args):
    """`path` when it holds a checkpoint (or names no local folder: a hub id). The default folder, when it holds
    no checkpoint, is made by running `pretraining_command` (a list, e.g. `[python, run_mim.py, --output_dir,
    path]`) as a single-process run, by the main process while the others wait (by each machine's main process
    with `--save_on_each_node`: machines that share no filesystem); another local folder without one is refused,
    naming that command."""
    if has_checkpoint(path) or not (is_default or os.path.exists(path)):
        return path
    command = " ".join(pretraining_command)
    if not is_default:
        raise ValueError(
            f"--vision_model_name_or_path {path}: no checkpoint there (config.json). Make one with `{command}`."
        )
    per_machine = training_args.save_on_each_node
    with training_args.main_process_first(local=per_machine, desc="pretraining the image tower"):
        main_process = training_args.local_process_index == 0 if per_machine else training_args.process_index == 0
        if main_process and not has_checkpoint(path):
            logger.warning("No SimMIM checkpoint in %s: pretraining one first with `%s`.", path, command)
            subprocess.run(pretraining_command, check=True, env=single_process_environment())
    if not has_checkpoint(path):  # the main process failed (its error is in its log), or wrote where this one cannot see
        raise RuntimeError(
            f"No SimMIM checkpoint in {path} after `{command}` on the main process: see its log; if the machines "
            "share no filesystem, pass --save_on_each_node."
        )
    return path


def has_checkpoint(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def load_vision_config(path):
    """The `SimMIMConfig` of the image tower's checkpoint; another model type or a non-RGB model is refused."""
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, SimMIMConfig):
        raise ValueError(
            f"--vision_model_name_or_path {path} is a {config.model_type!r} model, not a SimMIM one: give the output "
            "folder of run_mim.py (or a converted SimMIM checkpoint)."
        )
    check_rgb_model(config)
    return config


def train_caption_tokenizer(captions):
    """A WordPiece tokenizer trained (with the `tokenizers` library) on `captions`: lower-cased BERT pre-tokenizing,
    `[CLS] ... [SEP]` around each text, as the BERT text tower expects. Its `model_max_length` is the longest
    caption's length, so no caption is ever truncated."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(captions, trainers.WordPieceTrainer(special_tokens=list(SPECIAL_TOKENS.values())))
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))]
    )
    longest = max(len(encoding.ids) for encoding in tokenizer.encode_batch(captions))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=longest, **SPECIAL_TOKENS)


def text_tower(tokenizer, model_args):
    """A small BERT from config, sized by `model_args`, over `tokenizer`'s vocabulary."""
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.text_hidden_size,
        num_hidden_layers=model_args.text_num_hidden_layers,
        num_attention_heads=model_args.text_num_attention_heads,
        intermediate_size=4 * model_args.text_hidden_size,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config)


def dual_encoder(vision_path, vision_config, tokenizer, model_args, seed, random_vision=False):
    """`VisionTextDualEncoderModel`: the SimMIM encoder of `vision_path` (or, `random_vision`, the same
    architecture freshly initialised) and a new text tower. The text tower, projections and temperature are
    drawn from `seed` after the vision tower, so runs with either vision tower start from the same text side."""
    if random_vision:
        vision = SimMIMModel(vision_config)
    else:
        vision = SimMIMModel.from_pretrained(vision_path)
    set_seed(seed)
    text = text_tower(tokenizer, model_args)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision.config, text.config, projection_dim=model_args.projection_dim
    )
    return VisionTextDualEncoderModel(config=config, vision_model=vision, text_model=text)


class CaptionCollator:
    """Rows of a `SeededImageDataset` (pixel values, label) -> a `VisionTextDualEncoderModel` batch: the images,
    each label's caption tokenized, and the labels (for `CaptionContrastiveTrainer`'s loss)."""

    def __init__(self, tokenizer, captions):
        self.tokenizer = tokenizer
        self.captions = captions

    def __call__(self, rows):
        batch = collate_fn(rows)
        texts = [self.captions[label] for label in batch["labels"].tolist()]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {"pixel_values": batch["pixel_values"], **tokens, "labels": batch["labels"]}


class CaptionContrastiveTrainer(Trainer):
    """`Trainer` with CLIP's symmetric contrastive loss, where every image-caption pair of the same class is a
    positive: captions made from labels repeat within a batch, and CLIP's own loss (only the diagonal positive) would
    push an image away from its own class's caption wherever another image of that class is in the batch."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs, return_loss=False)
        same_class = (labels[:, None] == labels[None, :]).float()
        targets = same_class / same_class.sum(dim=1, keepdim=True)
        logits = outputs.logits_per_image
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        return (loss, outputs) if return_outputs else loss


def captioned_datasets(raw_datasets, processor, data_args, seed):
    """`(train, held-out)` `SeededImageDataset`s of labelled images (training rows randomly cropped and flipped,
    held-out ones centre-cropped), with the class names and one caption per class."""
    train, validation = raw_datasets
    if validation is None:
        raise ValueError("Zero-shot accuracy needs held-out images: pass --validation_dir or a "
                         "--validation_split_percentage > 0.")
    image_column = detect_image_column(train, data_args.image_column_name)
    names = label_names(train, data_args.label_column_name)
    captions = [data_args.caption_template.format(name) for name in names]
    augmentation = finetuning_augmentation(processor.image_size, rand_augment=None, random_erasing=0.0)
    datasets = finetuning_datasets(
        raw_datasets, processor, augmentation, image_column, data_args.label_column_name, seed
    )
    return datasets, image_column, names, captions


def train_dual_encoder(model, processor, training_args, datasets, collator, output_dir):
    """Train `model` contrastively on `Trainer` and save it with its processor (tokenizer and image processor) to
    `output_dir`; return the `TrainOutput`."""
    args = dataclasses.replace(training_args, output_dir=output_dir)
    trainer = CaptionContrastiveTrainer(
        model=model,
        args=args,
        train_dataset=datasets[0],
        eval_dataset=datasets[1] if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=processor,
    )
    trainer.add_callback(EpochCallback(datasets[0]))
    result = trainer.train()
    trainer.save_model()
    return result


def held_out_images(dataset, image_column, label_column, readable_rows):
    """`(images, labels)` of the held-out rows whose image decodes (a failing one is reported and left out)."""
    cells = undecoded(dataset, image_column)
    images, labels = [], []
    for row in readable_rows.tolist():
        example = cells[row]
        try:
            images.append(decode_image(example[image_column]))
        except UndecodableImage as error:
            report_skipped_image(f"held-out row {row}", error)
            continue
        labels.append(example[label_column])
    return images, labels


class _DropUnlistedModelError(logging.Filter):
    """transformers logs an error when a pipeline gets a model outside its task's list; the zero-shot pipeline
    runs `VisionTextDualEncoderModel` all the same (it reads `logits_per_image`), so that one message is dropped."""

    def filter(self, record):
        return "VisionTextDualEncoderModel' is not supported" not in record.getMessage()


def zero_shot_accuracy(model, processor, images, labels, names, template):
    """Top-1 (and top-5, with more than 5 classes) accuracy of `model` classifying `images` among `names`
    through transformers' `zero-shot-image-classification` pipeline, prompting with `template`."""
    model.eval()
    pipeline_logger, drop = logging.getLogger("transformers.pipelines.base"), _DropUnlistedModelError()
    pipeline_logger.addFilter(drop)
    try:
        classifier = pipeline(
            "zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
            image_processor=processor.image_processor, device=model.device,
        )
    finally:
        pipeline_logger.removeFilter(drop)
    predictions = classifier(images, candidate_labels=names, hypothesis_template=template)
    scores = np.array([[{p["label"]: p["score"] for p in ranked}[name] for name in names] for ranked in predictions])
    ks = accuracy_ks(len(names))
    return metrics.load("top_k_accuracy").compute(predictions=scores, references=labels, k=ks)
