"""transformers' `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` / `Swinv2ForMaskedImageModeling`
checkpoints in, and the key names both directions share (`to_transformers` writes them out); transformers' ResNet /
ConvNext / ConvNextV2 models and classifiers in through `cnn_weights`."""

import json
import math
import os
import re

import torch
from safetensors.torch import load_file

from ..models.configuration_simmim import SimMIMConfig
from .cnn_weights import TRANSFORMERS_MODEL_TYPES as CNN_MODEL_TYPES
from .cnn_weights import config_from_transformers_cnn, convert_cnn_checkpoint
from .common import DERIVED_BUFFERS, load_strict, save_with_processor


# (transformers' on-disk key, ours), relative to the base models (transformers' `ViTModel` / `BeitModel` /
# `SwinModel`, our `SimMIMModel`); {i}/{j} match block / stage indices. q/k/v are fused separately.
VIT_KEYS = [
    ("embeddings.cls_token", "encoder.cls_token"),
    ("embeddings.mask_token", "encoder.mask_token"),
    ("embeddings.position_embeddings", "encoder.pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", "encoder.patch_embed.proj.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "encoder.blocks.{i}.attn.proj.{p}"),
    ("encoder.layer.{i}.layernorm_before.{p}", "encoder.blocks.{i}.norm1.{p}"),
    ("encoder.layer.{i}.layernorm_after.{p}", "encoder.blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "encoder.blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "encoder.blocks.{i}.mlp.fc2.{p}"),
    ("layernorm.{p}", "encoder.norm.{p}"),
]
VIT_QKV = ("encoder.layer.{i}.attention.attention.{qkv}.{p}", "encoder.blocks.{i}.attn.qkv.{p}")
# BEiT is ViT plus the official SimMIM ViT's extras, under its own names (its q/k/v keys are ViT's).
BEIT_KEYS = VIT_KEYS + [
    (
        "encoder.relative_position_bias.relative_position_bias_table",
        "encoder.rel_pos_bias.relative_position_bias_table",
    ),
    (
        "encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table",
        "encoder.blocks.{i}.rel_pos_bias.relative_position_bias_table",
    ),
    ("encoder.layer.{i}.lambda_1", "encoder.blocks.{i}.gamma_1"),
    ("encoder.layer.{i}.lambda_2", "encoder.blocks.{i}.gamma_2"),
    ("pooler.layernorm.{p}", "pooler.fc_norm.{p}"),
]
SWIN_KEYS = [
    ("embeddings.mask_token", "encoder.mask_token"),
    ("embeddings.position_embeddings", "encoder.absolute_pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", "encoder.patch_embed.proj.{p}"),
    ("embeddings.norm.{p}", "encoder.patch_embed.norm.{p}"),
    ("encoder.layers.{i}.blocks.{j}.layernorm_before.{p}", "encoder.layers.{i}.blocks.{j}.norm1.{p}"),
    (
        "encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table",
        "encoder.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
    ),
    ("encoder.layers.{i}.blocks.{j}.attention.output.dense.{p}", "encoder.layers.{i}.blocks.{j}.attn.proj.{p}"),
    ("encoder.layers.{i}.blocks.{j}.layernorm_after.{p}", "encoder.layers.{i}.blocks.{j}.norm2.{p}"),
    ("encoder.layers.{i}.blocks.{j}.intermediate.dense.{p}", "encoder.layers.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("encoder.layers.{i}.blocks.{j}.output.dense.{p}", "encoder.layers.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("encoder.layers.{i}.downsample.reduction.{p}", "encoder.layers.{i}.downsample.reduction.{p}"),
    ("encoder.layers.{i}.downsample.norm.{p}", "encoder.layers.{i}.downsample.norm.{p}"),
    ("layernorm.{p}", "encoder.norm.{p}"),
]
SWIN_QKV = ("encoder.layers.{i}.blocks.{j}.attention.self.{qkv}.{p}", "encoder.layers.{i}.blocks.{j}.attn.qkv.{p}")
# Swinv2 is Swin (the same norm names: transformers' `layernorm_before` / `layernorm_after` are the official post-norms
# `norm1` / `norm2`) with its cosine attention's parameters; the query and value biases are the official q/v biases
# (transformers' key has no bias either), so only the q/k/v weights are fused.
_SWINV2_BLOCK = "encoder.layers.{i}.blocks.{j}."
SWINV2_KEYS = [pair for pair in SWIN_KEYS if "relative_position_bias_table" not in pair[0]] + [
    (_SWINV2_BLOCK + "attention.self.logit_scale", _SWINV2_BLOCK + "attn.logit_scale"),
    (_SWINV2_BLOCK + "attention.self.query.bias", _SWINV2_BLOCK + "attn.q_bias"),
    (_SWINV2_BLOCK + "attention.self.value.bias", _SWINV2_BLOCK + "attn.v_bias"),
    (_SWINV2_BLOCK + "attention.self.continuous_position_bias_mlp.0.{p}", _SWINV2_BLOCK + "attn.cpb_mlp.0.{p}"),
    (_SWINV2_BLOCK + "attention.self.continuous_position_bias_mlp.2.weight", _SWINV2_BLOCK + "attn.cpb_mlp.2.weight"),
]
SWINV2_QKV = (_SWINV2_BLOCK + "attention.self.{qkv}.weight", _SWINV2_BLOCK + "attn.qkv.weight")
# Each transformers architecture's key tables.
KEY_TABLES = {"vit": (VIT_KEYS, VIT_QKV), "swin": (SWIN_KEYS, SWIN_QKV), "swinv2": (SWINV2_KEYS, SWINV2_QKV)}
# The heads, outside the base models, under the same names on both sides.
DECODER_KEYS = [("decoder.0.{p}", "decoder.0.{p}")]
CLASSIFIER_KEYS = [("classifier.{p}", "classifier.{p}")]
_GROUPS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)", "qkv": r"(?P<qkv>query|key|value)"}


def prefixed(pairs, theirs, ours):
    """Key pairs of the base models -> the same pairs inside heads (`theirs` e.g. "vit.", `ours` "simmim.")."""
    return [(theirs + a, ours + b) for a, b in pairs]


def _pattern(template):
    regex = re.escape(template)
    for name, group in _GROUPS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile("^" + regex + "$")


def rename_keys(state_dict, pairs, qkv_pair, forward):
    """Rename keys by template pairs (forward: transformers -> ours); fuse or split q/k/v."""
    rules = [(_pattern(a if forward else b), b if forward else a) for a, b in pairs]
    out, unmatched = {}, []
    qkv_src, qkv_dst = qkv_pair if forward else qkv_pair[::-1]
    qkv_re = _pattern(qkv_src)
    fused = {}
    for key, value in state_dict.items():
        if DERIVED_BUFFERS.search(key):
            continue
        match = qkv_re.match(key)
        if match:
            groups = match.groupdict()
            if forward:
                target = qkv_dst.format(**{k: v for k, v in groups.items() if k != "qkv"})
                fused.setdefault(target, {})[groups["qkv"]] = value
            else:
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[qkv_dst.format(qkv=name, **groups)] = part.clone()
            continue
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                out[target.format(**match.groupdict())] = value
                break
        else:
            unmatched.append(key)
    for target, parts in fused.items():
        out[target] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unmatched:
        raise ValueError(f"Unrecognised weights: {sorted(unmatched)[:8]}{' ...' if len(unmatched) > 8 else ''}")
    return out


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def config_from_transformers(hf_config, **overrides):
    """A transformers ViT/Swin/Swinv2/ResNet/ConvNext/ConvNextV2 config (dict or object) -> `SimMIMConfig` computing
    the same function (the CNNs: see `cnn_weights.config_from_transformers_cnn`)."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if c["model_type"] in CNN_MODEL_TYPES:
        return config_from_transformers_cnn(c, **overrides)
    common = dict(
        image_size=_first(c.get("image_size", 224)),
        patch_size=_first(c.get("patch_size", 16)),
        num_channels=c.get("num_channels", 3),
        qkv_bias=c.get("qkv_bias", True),
        hidden_act=c.get("hidden_act", "gelu"),
        hidden_dropout_prob=c.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=c.get("attention_probs_dropout_prob", 0.0),
        initializer_range=c.get("initializer_range", 0.02),
        mask_token_type="learned",
    )
    if c["model_type"] == "vit":
        kwargs = dict(
            common,
            backbone="vit",
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            mlp_ratio=c["intermediate_size"] / c["hidden_size"],
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            use_absolute_position_embeddings=True,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=False,
            layer_scale_init_value=0.0,
            drop_path_rate=0.0,
        )
    elif c["model_type"] in ("swin", "swinv2"):
        kwargs = dict(common, **_swin_fields(c))
    else:
        raise ValueError(
            f"model_type={c['model_type']!r}: only transformers 'vit', 'swin', 'swinv2', 'resnet', 'convnext' and "
            "'convnextv2' checkpoints convert."
        )
    if kwargs["image_size"] % 32 and "mask_patch_size" not in overrides:
        kwargs["mask_patch_size"] = math.gcd(kwargs["image_size"], 32)
    kwargs.update(overrides)
    return SimMIMConfig(**kwargs)


def _swin_fields(c):
    """Our Swin / SwinV2 fields of a transformers Swin / Swinv2 config dict."""
    name = "Swin" if c["model_type"] == "swin" else "Swinv2"
    if c.get("layer_norm_eps", 1e-5) != 1e-5:
        raise ValueError(
            f"layer_norm_eps={c['layer_norm_eps']}: transformers' {name} uses eps 1e-5 in its patch-embedding norm "
            "and this value elsewhere, which hf_simmim's single layer_norm_eps cannot express."
        )
    if c["model_type"] == "swinv2" and c.get("use_absolute_embeddings"):
        raise ValueError(
            "use_absolute_embeddings=True: transformers' Swinv2 holds num_patches + 1 absolute positions and fails "
            "to add them to its num_patches tokens, so such a checkpoint has no function to convert."
        )
    fields = dict(
        backbone=c["model_type"],
        embed_dim=c["embed_dim"],
        depths=c["depths"],
        num_heads=c["num_heads"],
        window_size=c["window_size"],
        mlp_ratio=c.get("mlp_ratio", 4.0),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        use_absolute_position_embeddings=c.get("use_absolute_embeddings", False),
        drop_path_rate=c.get("drop_path_rate", 0.1),
    )
    if c["model_type"] == "swinv2":
        fields["pretrained_window_sizes"] = list(c.get("pretrained_window_sizes", [0, 0, 0, 0]))[: len(c["depths"])]
    return fields


def load_transformers_checkpoint(model_dir):
    """`(config_dict, state_dict)` of a transformers checkpoint folder (safetensors, possibly sharded, or .bin)."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir} has no config.json: expected a transformers checkpoint folder.")
    with open(config_path) as f:
        config = json.load(f)
    state_dict = {}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    for name in files:
        state_dict.update(load_file(os.path.join(model_dir, name)))
    if not files and os.path.isfile(os.path.join(model_dir, "pytorch_model.bin")):
        state_dict = torch.load(os.path.join(model_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if not state_dict:
        raise FileNotFoundError(f"{model_dir} has no model.safetensors or pytorch_model.bin.")
    return config, state_dict


def convert_transformers_state_dict(state_dict, model_type, num_patches=None):
    """A transformers `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` / `Swinv2ForMaskedImageModeling`
    state dict -> ours."""
    base, qkv = KEY_TABLES[model_type]
    prefix = model_type + "."
    pairs = prefixed(base, prefix, "simmim.") + DECODER_KEYS
    sd = dict(state_dict)
    position_key = "swin.embeddings.position_embeddings"
    if model_type == "swin" and position_key in sd:
        # Checkpoints of older transformers versions hold one extra (unused) position; ours one per patch.
        sd[position_key] = sd[position_key][:, :num_patches]
    return rename_keys(sd, pairs, prefixed([qkv], prefix, "simmim.")[0], forward=True)


def convert_transformers_checkpoint(model_dir, output_dir=None, **overrides):
    """A transformers `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` / `Swinv2ForMaskedImageModeling`
    folder -> ours; a `ResNet` / `ConvNext` / `ConvNextV2` `Model` or `ForImageClassification` folder -> our
    pretraining model with that encoder (`cnn_weights.convert_cnn_checkpoint`)."""
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    hf_config, state_dict = load_transformers_checkpoint(model_dir)
    if hf_config.get("model_type") in CNN_MODEL_TYPES:
        return convert_cnn_checkpoint(model_dir, hf_config, state_dict, output_dir, **overrides)
    config = config_from_transformers(hf_config, **overrides)
    if hf_config.get("encoder_stride", config.encoder_stride) != config.encoder_stride:
        raise ValueError(
            f"{model_dir}: encoder_stride={hf_config['encoder_stride']} does not match the encoder's downsampling "
            f"{config.encoder_stride}; this checkpoint's decoder cannot reconstruct full-size images."
        )
    converted = convert_transformers_state_dict(state_dict, hf_config["model_type"], config.num_patches)
    model = SimMIMForMaskedImageModeling(config)
    strict = any(k.startswith("decoder.") for k in converted)
    load_strict(model, converted, model_dir, allow_missing_decoder=not strict)
    if output_dir is not None:
        save_with_processor(model, output_dir)
    return model
