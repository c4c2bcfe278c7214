"""The official SimMIM fine-tuning recipe: layer-wise learning-rate decay and mixup / cutmix.

Layer ids follow microsoft/SimMIM `optimizer.py` (`get_vit_layer`, `get_swin_layer`): with `L` the number of
blocks, embeddings (patch embedding, CLS and mask tokens, absolute position embedding) are layer 0, block `i` is
layer `i + 1`, and everything after the blocks (final norm, fc_norm, head, the ViT shared relative position bias)
is layer `L + 1`; a Swin patch merging belongs to the last block of its stage. A parameter of layer `k` learns at
`lr * layer_decay ** (L + 1 - k)`.
"""

import numpy as np
import torch

from .training import SimMIMTrainer, no_weight_decay_parameter_names

ENCODER_PREFIX = "simmim.encoder."


def num_layers(config):
    """`L + 2`: the number of layer ids (embeddings, each block, everything after)."""
    blocks = config.num_hidden_layers if config.backbone == "vit" else sum(config.depths)
    return blocks + 2


def layer_id(name, config):
    """The official layer id of a parameter of `SimMIMForImageClassification` / `SimMIMModel` (by name)."""
    last = num_layers(config) - 1
    for prefix in (ENCODER_PREFIX, "encoder."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    else:
        return last  # pooler (fc_norm), classifier, decoder
    parts = name.split(".")
    if parts[0] in ("cls_token", "mask_token", "patch_embed") or (config.backbone == "vit" and parts[0] == "pos_embed"):
        return 0
    if config.backbone == "vit":
        return int(parts[1]) + 1 if parts[0] == "blocks" else last  # else: norm, shared relative position bias
    if parts[0] == "layers":
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(config.depths[: stage + 1])
        return sum(config.depths[:stage]) + int(parts[3]) + 1
    return last  # norm, absolute_pos_embed (as the official get_swin_layer)


def layer_scales(config, layer_decay):
    n = num_layers(config)
    return [layer_decay ** (n - 1 - i) for i in range(n)]


def layer_decay_parameter_groups(model, learning_rate, weight_decay=0.05, layer_decay=0.9):
    """AdamW parameter groups with per-layer learning rates `learning_rate * scale` and the recipe's weight decay
    exemptions. Each group carries `layer_id` and `lr_scale` for inspection. The head's layer comes first: the
    `Trainer` logs the first group's learning rate, which is then the peak one, not the embeddings' decayed one."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must lie in (0, 1] (official: 0.65 ViT-B, 0.9 Swin-B 100 ep).")
    config = model.config
    scales = layer_scales(config, layer_decay)
    skip = no_weight_decay_parameter_names(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, config)
        decay = 0.0 if name in skip else weight_decay
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": decay,
                "lr": learning_rate * scales[lid],
                "lr_scale": scales[lid],
                "layer_id": lid,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


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


class SimMIMFineTuneTrainer(SimMIMTrainer):
    """`SimMIMTrainer` for classification: AdamW over `layer_decay_parameter_groups` (each layer's learning rate
    follows the schedule scaled by its `lr_scale`), and mixup / cutmix on training batches only."""

    def __init__(self, *args, layer_decay=1.0, mixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.mixup = mixup

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = layer_decay_parameter_groups(model, self.args.learning_rate, self.args.weight_decay, self.layer_decay)
            for group in groups:
                group.pop("names")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # each group has its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        if self.mixup is not None:
            inputs = self.mixup(inputs)
        return super().training_step(model, inputs, *args, **kwargs)
