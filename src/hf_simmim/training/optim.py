"""Optimizer parameter groups of the SimMIM recipe: which parameters get weight decay, the official layer ids and
layer-wise learning-rate scales of fine-tuning, and the linear learning-rate scaling rule.

As in microsoft/SimMIM `optimizer.py`, the encoder answers for its own parameters (`no_weight_decay()`,
`no_weight_decay_keywords()`, `num_layers()`, `layer_id(name)`); the rest is the official generic rule. A parameter
is not decayed iff it is 1-D, its name ends with `.bias`, the encoder or the decoder names it (the CNNs'
hierarchical decoder: its mask tokens, as SparK), or (fine-tuning only) one of the encoder's keywords is in its name.
Parameters outside the encoder (decoder, pooler, head) are in the last layer.
A parameter of layer `k` of `n` learns at `lr * layer_decay ** (n - 1 - k)`.
"""

from ..models.modeling_simmim import SimMIMForMaskedImageModeling

# `lr = base_lr * total_batch_size / LR_REFERENCE_BATCH_SIZE` (the paper's linear scaling rule).
LR_REFERENCE_BATCH_SIZE = 512


def encoder_and_prefix(model):
    """The model's encoder (any backbone) and the prefix of its parameter names in `model.named_parameters()`."""
    if hasattr(model, "simmim"):  # SimMIMForMaskedImageModeling, SimMIMForImageClassification
        return model.simmim.encoder, "simmim.encoder."
    return model.encoder, "encoder."  # SimMIMModel


def no_weight_decay_parameter_names(model, pretraining=None, extra_names=()):
    """Names of the trainable parameters the official SimMIM code does not decay, plus any whose name contains one
    of `extra_names` (an opt-in: e.g. `("relative_position_bias_table", "mask_token")`).

    `pretraining` (default: whether `model` is a `SimMIMForMaskedImageModeling`) drops the encoder's keywords: the
    official pretraining wrapper prefixes them with `encoder.`, so they never match a parameter name: Swin's
    relative position bias tables, and SwinV2's logit scales and position-bias MLP weights, are decayed in pretraining
    but not in fine-tuning.
    """
    encoder, prefix = encoder_and_prefix(model)
    if pretraining is None:
        pretraining = isinstance(model, SimMIMForMaskedImageModeling)
    exempt = {prefix + name for name in encoder.no_weight_decay()}
    decoder = getattr(model, "decoder", None)
    if hasattr(decoder, "no_weight_decay"):
        exempt |= {"decoder." + name for name in decoder.no_weight_decay()}
    keywords = tuple(extra_names) + (() if pretraining else tuple(encoder.no_weight_decay_keywords()))
    return {
        name
        for name, param in model.named_parameters()
        if param.requires_grad
        and (param.ndim == 1 or name.endswith(".bias") or name in exempt or any(k in name for k in keywords))
    }


def parameter_layer_ids(model):
    """`{name: official layer id}` for every parameter, and the number of layer ids."""
    encoder, prefix = encoder_and_prefix(model)
    num_layers = encoder.num_layers()
    ids = {
        name: encoder.layer_id(name[len(prefix) :]) if name.startswith(prefix) else num_layers - 1
        for name, _ in model.named_parameters()
    }
    return ids, num_layers


def layer_scales(num_layers, layer_decay):
    """The official `scales`: `layer_decay ** (num_layers - 1 - layer_id)` for each layer id."""
    return [layer_decay**i for i in reversed(range(num_layers))]


def layer_decay_parameter_groups(
    model, learning_rate, weight_decay=0.05, layer_decay=0.9, pretraining=None, extra_no_decay_names=()
):
    """AdamW parameter groups with per-layer learning rates `learning_rate * scale` and the official weight decay
    exemptions (`no_weight_decay_parameter_names`). Each group carries its parameter `names`, `layer_id` and
    `lr_scale`. The head's layer comes first: the `Trainer` logs the first group's learning rate, which is then the
    peak one, not the embeddings' decayed one."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay} must lie in (0, 1] (official: 0.65 ViT-B, 0.9 Swin-B 100 ep).")
    layer_ids, num_layers = parameter_layer_ids(model)
    scales = layer_scales(num_layers, layer_decay)
    skip = no_weight_decay_parameter_names(model, pretraining, extra_no_decay_names)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_ids[name]
        decay = 0.0 if name in skip else weight_decay
        if (lid, decay) not in groups:
            groups[lid, decay] = {
                "params": [],
                "names": [],
                "weight_decay": decay,
                "lr": learning_rate * scales[lid],
                "lr_scale": scales[lid],
                "layer_id": lid,
            }
        groups[lid, decay]["params"].append(param)
        groups[lid, decay]["names"].append(name)
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
