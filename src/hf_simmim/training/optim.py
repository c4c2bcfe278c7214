"""Optimizer parameter groups of the SimMIM recipe: which parameters get weight decay, the official layer ids and
layer-wise learning-rate scales of fine-tuning, and the linear learning-rate scaling rule.

Layer ids follow microsoft/SimMIM `optimizer.py` (`get_vit_layer`, `get_swin_layer`): with `L` the number of
blocks, embeddings (patch embedding, CLS and mask tokens, absolute position embedding) are layer 0, block `i` is
layer `i + 1`, and everything after the blocks (final norm, fc_norm, head, the ViT shared relative position bias)
is layer `L + 1`; a Swin patch merging belongs to the last block of its stage. A parameter of layer `k` learns at
`lr * layer_decay ** (L + 1 - k)`.
"""

from torch import nn

# Parameters that the official code exempts from weight decay by name (besides 1-D parameters and biases):
# `no_weight_decay()` / `no_weight_decay_keywords()` of its ViT and Swin, plus the transformers spellings.
NO_DECAY_KEYWORDS = (
    "pos_embed",  # ViT absolute position embedding (also matches Swin's absolute_pos_embed)
    "position_embedding",
    "cls_token",
    "mask_token",
    "relative_position_bias_table",
)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
ENCODER_PREFIX = "simmim.encoder."

# `lr = base_lr * total_batch_size / LR_REFERENCE_BATCH_SIZE` (the paper's linear scaling rule).
LR_REFERENCE_BATCH_SIZE = 512


def no_weight_decay_parameter_names(model):
    """Names of the trainable parameters the SimMIM recipe does not decay: normalisation layers, biases, other
    1-D parameters (e.g. layer scale), position embeddings, CLS and mask tokens, relative position bias tables."""
    norm_parameters = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_MODULES):
            for name, _ in module.named_parameters(recurse=False):
                norm_parameters.add(f"{module_name}.{name}" if module_name else name)
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (
            name in norm_parameters
            or param.ndim <= 1
            or name.endswith("bias")
            or any(keyword in name for keyword in NO_DECAY_KEYWORDS)
        ):
            names.add(name)
    return names


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


def scale_learning_rate(base_lr, total_batch_size, reference_batch_size=LR_REFERENCE_BATCH_SIZE):
    """`base_lr * total_batch_size / 512`: the learning rate for a total (all processes, all accumulation steps)
    batch size."""
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size={total_batch_size} must be positive.")
    return base_lr * total_batch_size / reference_batch_size


def total_train_batch_size(args):
    """Images per optimizer step over all processes and accumulation steps."""
    return args.per_device_train_batch_size * max(args.world_size, 1) * args.gradient_accumulation_steps
