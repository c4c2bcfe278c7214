"""The model card a pretraining run writes as `README.md` of its output folder (and uploads with `push_to_hub`).

The template is `model_cards/simmim_pretraining.md` inside the package (`string.Template` placeholders); the hub
metadata comes from `huggingface_hub.ModelCardData`, and the filled card is parsed with
`huggingface_hub.ModelCard` before it is written, so an invalid card fails the run's last step, not the upload.
"""

import math
import os
import platform
import string
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from ..models.masking import USER_MASK_MIN_SHARE, mask_generator_for


TEMPLATE = "simmim_pretraining.md"
TAGS = ["simmim", "masked-image-modeling", "self-supervised-learning", "vision", "hf_simmim"]


def load_template(name=TEMPLATE):
    """The text of a template shipped in `hf_simmim/model_cards/`."""
    return resources.files("hf_simmim").joinpath("model_cards", name).read_text(encoding="utf-8")


def card_metadata(license="apache-2.0", datasets=None, base_model=None, tags=()):
    """Hub metadata: library, license, tags, pipeline, and the datasets / base model when they are hub ids."""
    data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(dict.fromkeys([*TAGS, *tags])),
        pipeline_tag="image-feature-extraction",
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
    )
    return data


def render_model_card(values, metadata, template=None):
    """Fill the template with `values` (a dict; missing entries raise `KeyError`) and `metadata`
    (`ModelCardData`); return a validated `huggingface_hub.ModelCard`."""
    text = string.Template(template if template is not None else load_template()).substitute(
        {**values, "metadata": metadata.to_yaml()}
    )
    card = ModelCard(text)  # parses the YAML front matter; raises ValueError if it is not valid metadata
    return card


def _fmt(value, digits=4):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _sentence(text):
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _last(log_history, key):
    for entry in reversed(log_history):
        if key in entry:
            return entry[key]
    return None


def _framework_versions():
    import datasets
    import torch
    import transformers

    from .. import __version__

    return "\n".join(
        f"- {name} {version}"
        for name, version in (
            ("hf_simmim", __version__),
            ("transformers", transformers.__version__),
            ("torch", torch.__version__),
            ("datasets", datasets.__version__),
            ("python", platform.python_version()),
        )
    )


def is_hub_id(name):
    """Whether `name` looks like a hub repository id (not a local path)."""
    return bool(name) and not os.path.exists(name) and name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def describe_architecture(config):
    """The encoder in a few words, e.g. `ViT (12 layers, width 768, 12 heads)`."""
    if config.backbone == "vit":
        return f"ViT ({config.num_hidden_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads)"
    if config.backbone in ("swin", "swinv2"):
        windows = list(getattr(config, "pretrained_window_sizes", None) or [])
        pretrained = f", pretrained windows {windows}" if any(windows) else ""
        return (
            f"{'SwinV2' if config.backbone == 'swinv2' else 'Swin'} (embed dim {config.embed_dim}, depths "
            f"{list(config.depths)}, heads {list(config.num_heads)}, window {config.window_size}{pretrained})"
        )
    kind = "ResNet" if config.backbone == "resnet" else f"ConvNeXt V{config.convnext_version}"
    return (
        f"{kind} (widths {list(config.hidden_sizes)}, depths {list(config.depths)}, {config.conv_masking} masking)"
    )


def describe_target(config):
    """What the decoder learns to predict, for the card's opening sentence and its Loss row."""
    return {
        None: "the raw pixels",
        "local": f"the pixels standardised over their {config.norm_target_patch_size}-pixel neighbourhood",
        "patch": f"the pixels standardised within each {config.patch_size}-pixel patch",
        "mask_patch": f"the pixels standardised within each {config.mask_patch_size}-pixel square",
    }[config.norm_target]


def describe_decoder(config):
    if getattr(config, "decoder_type", "simmim") == "hierarchical":
        return f"a light hierarchical decoder over the stage outputs (SparK-style, width {config.decoder_hidden_size})"
    return f"one 1x1 convolution + PixelShuffle({config.encoder_stride})"


def describe_masking(config):
    """`(what is masked, the Masking row)` of the card for the config's `mask_strategy`, e.g. `("randomly
    masked 32-pixel squares", "random_block: 0.6 of the 32 x 32 px squares (30 of 49)")`."""
    masks = mask_generator_for(config)
    square = f"{config.mask_patch_size} x {config.mask_patch_size} px"
    patch = f"{config.patch_size} x {config.patch_size} px"
    patches = f"{masks.patch_count} of {masks.grid_size**2}"
    regions, row = {
        "random_block": (
            f"randomly masked {config.mask_patch_size}-pixel squares",
            f"{config.mask_ratio} of the {square} squares ({masks.mask_count} of {masks.token_count})",
        ),
        "random_patch": (
            f"randomly masked {config.patch_size}-pixel patches",
            f"{config.mask_ratio} of the {patch} patches, chosen at random ({patches})",
        ),
        "grid": (
            f"a checkerboard of masked {config.mask_patch_size}-pixel squares",
            f"a checkerboard of the {square} squares, either colour at random (half of them)",
        ),
        "block_wise": (
            f"randomly placed masked rectangles of {config.patch_size}-pixel patches",
            f"BEiT's rectangles of {patch} patches up to {config.mask_ratio} of them ({patches} at most)",
        ),
        "center": (
            "a masked centred box",
            f"a centred box of {config.mask_ratio} of the {patch} patches ({patches})",
        ),
        "user": (
            "the regions its own masks cover",
            f"each image's own mask from the data, snapped to the {patch} patches (a patch is masked when at "
            f"least {USER_MASK_MIN_SHARE:.0%} of its pixels are)",
        ),
    }[masks.mask_strategy]
    return regions, f"{masks.mask_strategy}: {row}"


def describe_weight_decay(trainer, model):
    """Which parameters the run's optimizer did not decay, beyond 1-D parameters and biases (by the last part of
    their names, e.g. `cls_token`, `classifier.weight`), read from the trainer's own decay list."""
    decayed = set(trainer.get_decay_parameter_names(model))
    by_name = sorted(
        {".".join(name.split(".")[-2 if name.endswith(".weight") else -1 :]) for name, param in model.named_parameters()
         if name not in decayed and param.ndim > 1 and not name.endswith(".bias")}
    )
    rule = "none on 1-D parameters (norms, layer scale), biases" + "".join(f", {name}" for name in by_name)
    extra = trainer.recipe.no_weight_decay_names
    return rule + (f" (--no_weight_decay_names {','.join(extra)})" if extra else " (as the official code)")


def describe_schedule(recipe, args, state):
    """The learning-rate schedule of a `SimMIMRecipe` in words (warmup and minimum rates are absolute)."""
    warmup = args.get_warmup_steps(max(state.max_steps, 1))
    start = f"linear warmup from {_fmt(recipe.warmup_lr)} over {warmup} steps"
    if recipe.schedule == "cosine":
        return f"{start}, then cosine to {_fmt(recipe.min_lr)}"
    if recipe.schedule == "multistep":
        return f"{start}, then x{recipe.gamma} at {', '.join(map(str, recipe.milestones))} of the run"
    return f"transformers '{args.lr_scheduler_type}' with {warmup} warmup steps"


WEIGHT_PRECISIONS = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def training_precision(trainer, model):
    """The precision training ran in: the autocast of the run's accelerator when it had one ("bf16 mixed
    precision"), else the dtype of the model's weights. The accelerator, not `args.bf16` / `args.fp16`, is what
    ran: it also takes `accelerate launch --mixed_precision` and ACCELERATE_MIXED_PRECISION, which leave those flags
    False, and autocasts bf16 on the CPU as well (`use_cpu=True` with `bf16=True`)."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and accelerator.native_amp:
        return f"{accelerator.mixed_precision} mixed precision"
    dtype = next((str(p.dtype) for p in model.parameters() if p.is_floating_point()), "torch.float32")
    return WEIGHT_PRECISIONS.get(dtype, dtype.removeprefix("torch."))


def trainer_card_values(trainer, run_info):
    """Everything the template needs, from a `SimMIMTrainer` after training and the run's `run_info` dict
    (`data_description`, `learning_rate_rule`, `skipped_images` (`training.runs.skipped_image_counts`), optional
    `model_name`, `model_id`)."""
    from ..training.optim import total_train_batch_size

    args, state = trainer.args, trainer.state
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    config = model.config
    augmentation = run_info["augmentation"]
    recipe = trainer.recipe
    masked_regions, masking = describe_masking(config)
    architecture, schedule = describe_architecture(config), describe_schedule(recipe, args, state)
    precision = training_precision(trainer, model)
    output_dir = args.output_dir
    model_id = run_info.get("model_id") or (trainer.hub_model_id if args.push_to_hub else None) or output_dir
    return {
        "model_name": run_info.get("model_name") or os.path.basename(os.path.normpath(output_dir)),
        "model_id": model_id,
        "architecture": architecture,
        "num_parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "encoder_stride": config.encoder_stride,
        "masked_regions": masked_regions,
        "masking": masking,
        "loss_type": config.loss_type.upper(),
        "target": describe_target(config),
        "decoder": describe_decoder(config),
        "data_description": _sentence(run_info.get("data_description") or "not recorded"),
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon,
        "weight_decay": args.weight_decay,
        "learning_rate": _fmt(args.learning_rate),
        "learning_rate_rule": run_info.get("learning_rate_rule", "set directly"),
        "schedule": schedule,
        "max_grad_norm": args.max_grad_norm,
        "total_batch_size": total_train_batch_size(args),
        "per_device_batch_size": args.per_device_train_batch_size,
        "world_size": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "precision": precision,
        "steps": state.global_step,
        "epochs": _fmt(float(state.epoch or 0.0), 3),
        "augmentation": augmentation.describe(),
        "image_mean": [round(value, 4) for value in trainer.processing_class.image_mean],
        "image_std": [round(value, 4) for value in trainer.processing_class.image_std],
        "recipe": run_info.get("recipe") or "the package defaults (no --recipe)",
        "weight_decay_rule": describe_weight_decay(trainer, model),
        "seed": args.seed,
        "final_loss": _fmt(_last(state.log_history, "loss")),
        "final_eval_loss": _fmt(_last(state.log_history, "eval_loss")),
        # counted once training and evaluation are done (a card pushed before that says n/a)
        "train_skipped_images": _fmt(run_info.get("skipped_images", {}).get("train_skipped_images")),
        "eval_skipped_images": _fmt(run_info.get("skipped_images", {}).get("eval_skipped_images")),
        "reconstruction_image": run_info.get("reconstruction_image", "reconstruction.png"),
        "loss_curve_image": run_info.get("loss_curve_image", "loss_curve.png"),
        "framework_versions": _framework_versions(),
    }


def write_model_card(trainer, run_info):
    """Write the filled card as `OUTPUT_DIR/README.md` (main process only); return its path.

    `run_info` may also hold `license`, `datasets` (hub ids) and `base_model` (a hub id) for the metadata.
    Signature fits `SimMIMTrainer(model_card_writer=functools.partial(write_model_card, run_info=...))`.
    """
    if not trainer.is_world_process_zero():
        return None
    return _save_card(trainer, run_info, trainer_card_values(trainer, run_info))


def _save_card(trainer, run_info, values, template=None, tags=(), pipeline_tag=None):
    """Render `values` into the template (default: the pretraining one) with the hub metadata of `run_info`
    (`license`, `datasets`, `base_model`), and save it as `OUTPUT_DIR/README.md`; return its path."""
    base_model = run_info.get("base_model")
    metadata = card_metadata(
        license=run_info.get("license", "apache-2.0"),
        datasets=run_info.get("datasets"),
        base_model=base_model if is_hub_id(base_model) else None,
        tags=tags,
    )
    if pipeline_tag is not None:
        metadata.pipeline_tag = pipeline_tag
    card = render_model_card(values, metadata, template)
    os.makedirs(trainer.args.output_dir, exist_ok=True)
    path = os.path.join(trainer.args.output_dir, "README.md")
    card.save(path)
    return path


FINETUNING_TEMPLATE = "simmim_finetuning.md"


def finetuning_card_values(trainer, run_info):
    """What the fine-tuning template needs, from a `SimMIMFineTuneTrainer` after training and `run_info`
    (`source`, `layer_decay`, `train_images`, `eval_images`, `classes`, `results` with the skipped-image counts of
    `training.runs.skipped_image_counts`)."""
    from ..training.optim import total_train_batch_size

    args, state = trainer.args, trainer.state
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.config
    architecture = describe_architecture(config)
    head = {
        "vit": "mean-pooled patch tokens, fc_norm, linear",
        "resnet": "average-pooled final feature map, linear",
        "convnext": "average-pooled final feature map, LayerNorm, linear",
    }.get(config.backbone, "average-pooled final tokens after the final norm, linear")
    mixup = trainer.mixup
    mixing = (
        f"mixup {mixup.mixup_alpha} / cutmix {mixup.cutmix_alpha}, label smoothing {mixup.label_smoothing}"
        if mixup is not None
        else f"label smoothing {args.label_smoothing_factor}"
    )
    results = run_info.get("results", {})
    rows = [f"| {key[5:] if key.startswith('eval_') else key} | {_fmt(value)} |" for key, value in results.items()
            if key.startswith("eval_top") or key == "eval_loss"]
    classes = run_info.get("classes", [])
    return {
        "model_name": os.path.basename(os.path.normpath(args.output_dir)),
        "model_id": run_info.get("model_id") or (trainer.hub_model_id if args.push_to_hub else None) or args.output_dir,
        "source": run_info.get("source", ""),
        "architecture": architecture,
        "head": head,
        "results_rows": "\n".join(rows) or "| (not evaluated) | |",
        "train_skipped_images": _fmt(results.get("train_skipped_images")),
        "eval_skipped_images": _fmt(results.get("eval_skipped_images")),
        "eval_images": run_info.get("eval_images", "n/a"),
        "train_images": run_info.get("train_images", "n/a"),
        "num_classes": len(classes),
        "class_names": ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else ""),
        "weight_decay": args.weight_decay,
        "learning_rate": _fmt(args.learning_rate),
        "layer_decay": run_info.get("layer_decay"),
        "schedule": describe_schedule(trainer.recipe, args, state),
        "drop_path_rate": config.drop_path_rate,
        "mixing": mixing,
        "augmentation": run_info["augmentation"].describe(),
        "recipe": run_info.get("recipe") or "the package defaults (no --recipe)",
        "weight_decay_rule": describe_weight_decay(trainer, model),
        "precision": training_precision(trainer, model),
        "total_batch_size": total_train_batch_size(args),
        "steps": state.global_step,
        "epochs": _fmt(float(state.epoch or 0.0), 3),
        "seed": args.seed,
        "framework_versions": _framework_versions(),
    }


def write_finetuning_card(trainer, run_info):
    """Write the fine-tuning card as `OUTPUT_DIR/README.md` (main process only); return its path."""
    if not trainer.is_world_process_zero():
        return None
    values = finetuning_card_values(trainer, run_info)
    template = load_template(FINETUNING_TEMPLATE)
    return _save_card(trainer, run_info, values, template, ("image-classification",), "image-classification")
