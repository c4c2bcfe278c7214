"""Fine-tuning specifics of the official recipe: the classification model (pretrained encoder + new head, or the
same architecture from scratch) and batch-level mixup / cutmix."""

import numpy as np
import torch

from ..data.augmentation import SMALL_IMAGE_SIZE
from ..models.configuration_simmim import SimMIMConfig
from ..models.image_processing_simmim import SimMIMImageProcessor
from ..models.modeling_simmim import SimMIMForImageClassification
from .runs import _parse_overrides



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
        one_hot = torch.full((labels.shape[0], self.num_classes), off)
        one_hot.scatter_(1, labels.view(-1, 1).cpu(), on)
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


def load_classification_model(model_args, num_labels, id2label=None):
    """`(SimMIMForImageClassification, SimMIMImageProcessor)`: pretrained encoder + new head, or (with
    `--from_scratch`) the same architecture with fresh weights."""
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
    processor = SimMIMImageProcessor.from_model_config(model.config, crop_pct=eval_crop_pct(model.config.image_size))
    if source:  # keep the normalisation the encoder was pretrained with
        try:
            pretrained = SimMIMImageProcessor.from_pretrained(source, cache_dir=model_args.cache_dir)
            processor.image_mean, processor.image_std = pretrained.image_mean, pretrained.image_std
        except OSError:
            pass
    return model, processor


def eval_crop_pct(image_size):
    """The official fine-tuning evaluation (timm): resize to int(256 / 224 x size), centre crop `size`; images of
    32 px or less are only normalised."""
    return 1.0 if image_size <= SMALL_IMAGE_SIZE else 224 / 256
