"""transformers' `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` checkpoints in, and our plain ViT / Swin
encoders out to transformers' own classes."""

import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file

from ..models.configuration_simmim import SimMIMConfig
from .common import DERIVED_BUFFERS, load_strict, save_with_processor


# (transformers' on-disk key, ours); {i}/{j} match block / stage indices. q/k/v are fused separately.
_VIT_KEYS = [
    ("vit.embeddings.cls_token", "simmim.encoder.cls_token"),
    ("vit.embeddings.mask_token", "simmim.encoder.mask_token"),
    ("vit.embeddings.position_embeddings", "simmim.encoder.pos_embed"),
    ("vit.embeddings.patch_embeddings.projection.{p}", "simmim.encoder.patch_embed.proj.{p}"),
    ("vit.encoder.layer.{i}.attention.output.dense.{p}", "simmim.encoder.blocks.{i}.attn.proj.{p}"),
    ("vit.encoder.layer.{i}.layernorm_before.{p}", "simmim.encoder.blocks.{i}.norm1.{p}"),
    ("vit.encoder.layer.{i}.layernorm_after.{p}", "simmim.encoder.blocks.{i}.norm2.{p}"),
    ("vit.encoder.layer.{i}.intermediate.dense.{p}", "simmim.encoder.blocks.{i}.mlp.fc1.{p}"),
    ("vit.encoder.layer.{i}.output.dense.{p}", "simmim.encoder.blocks.{i}.mlp.fc2.{p}"),
    ("vit.layernorm.{p}", "simmim.encoder.norm.{p}"),
    ("decoder.0.{p}", "decoder.0.{p}"),
]
_VIT_QKV = ("vit.encoder.layer.{i}.attention.attention.{qkv}.{p}", "simmim.encoder.blocks.{i}.attn.qkv.{p}")
_SWIN_KEYS = [
    ("swin.embeddings.mask_token", "simmim.encoder.mask_token"),
    ("swin.embeddings.patch_embeddings.projection.{p}", "simmim.encoder.patch_embed.proj.{p}"),
    ("swin.embeddings.norm.{p}", "simmim.encoder.patch_embed.norm.{p}"),
    ("swin.encoder.layers.{i}.blocks.{j}.layernorm_before.{p}", "simmim.encoder.layers.{i}.blocks.{j}.norm1.{p}"),
    (
        "swin.encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table",
        "simmim.encoder.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
    ),
    ("swin.encoder.layers.{i}.blocks.{j}.attention.output.dense.{p}", "simmim.encoder.layers.{i}.blocks.{j}.attn.proj.{p}"),
    ("swin.encoder.layers.{i}.blocks.{j}.layernorm_after.{p}", "simmim.encoder.layers.{i}.blocks.{j}.norm2.{p}"),
    ("swin.encoder.layers.{i}.blocks.{j}.intermediate.dense.{p}", "simmim.encoder.layers.{i}.blocks.{j}.mlp.fc1.{p}"),
    ("swin.encoder.layers.{i}.blocks.{j}.output.dense.{p}", "simmim.encoder.layers.{i}.blocks.{j}.mlp.fc2.{p}"),
    ("swin.encoder.layers.{i}.downsample.reduction.{p}", "simmim.encoder.layers.{i}.downsample.reduction.{p}"),
    ("swin.encoder.layers.{i}.downsample.norm.{p}", "simmim.encoder.layers.{i}.downsample.norm.{p}"),
    ("swin.layernorm.{p}", "simmim.encoder.norm.{p}"),
    ("decoder.0.{p}", "decoder.0.{p}"),
]
_SWIN_QKV = (
    "swin.encoder.layers.{i}.blocks.{j}.attention.self.{qkv}.{p}",
    "simmim.encoder.layers.{i}.blocks.{j}.attn.qkv.{p}",
)
_GROUPS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)", "qkv": r"(?P<qkv>query|key|value)"}


def _pattern(template):
    regex = re.escape(template)
    for name, group in _GROUPS.items():
        regex = regex.replace(re.escape("{" + name + "}"), group)
    return re.compile("^" + regex + "$")


def _rename(state_dict, pairs, qkv_pair, forward):
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
    """A transformers ViT/Swin config (dict or object) -> `SimMIMConfig` computing the same function."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
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
    elif c["model_type"] == "swin":
        if c.get("layer_norm_eps", 1e-5) != 1e-5:
            raise ValueError(
                f"layer_norm_eps={c['layer_norm_eps']}: transformers' Swin uses eps 1e-5 in its patch-embedding norm "
                "and this value elsewhere, which hf_simmim's single layer_norm_eps cannot express."
            )
        kwargs = dict(
            common,
            backbone="swin",
            embed_dim=c["embed_dim"],
            depths=c["depths"],
            num_heads=c["num_heads"],
            window_size=c["window_size"],
            mlp_ratio=c.get("mlp_ratio", 4.0),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
            use_absolute_position_embeddings=c.get("use_absolute_embeddings", False),
            drop_path_rate=c.get("drop_path_rate", 0.1),
        )
    else:
        raise ValueError(f"model_type={c['model_type']!r}: only transformers 'vit' and 'swin' checkpoints convert.")
    if kwargs["image_size"] % 32 and "mask_patch_size" not in overrides:
        kwargs["mask_patch_size"] = math.gcd(kwargs["image_size"], 32)
    kwargs.update(overrides)
    return SimMIMConfig(**kwargs)


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
    pairs, qkv = (_VIT_KEYS, _VIT_QKV) if model_type == "vit" else (_SWIN_KEYS, _SWIN_QKV)
    sd = dict(state_dict)
    if model_type == "swin" and "swin.embeddings.position_embeddings" in sd:
        # Checkpoints of older transformers versions hold one extra (unused) position; ours one per patch.
        sd["simmim_abs"] = sd.pop("swin.embeddings.position_embeddings")[:, :num_patches]
        pairs = pairs + [("simmim_abs", "simmim.encoder.absolute_pos_embed")]
    return _rename(sd, pairs, qkv, forward=True)


def convert_transformers_checkpoint(model_dir, output_dir=None, **overrides):
    """A transformers `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling` folder -> ours."""
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    hf_config, state_dict = load_transformers_checkpoint(model_dir)
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


def transformers_config_from_simmim(config):
    """Our config -> transformers `ViTConfig` / `SwinConfig`, or a clear error where transformers has no
    equivalent architecture."""
    from transformers import SwinConfig, ViTConfig

    if config.backbone == "vit":
        unsupported = [
            name
            for name, bad in [
                ("use_shared_relative_position_bias", config.use_shared_relative_position_bias),
                ("use_relative_position_bias", config.use_relative_position_bias),
                ("layer_scale_init_value", config.layer_scale_init_value),
                ("use_absolute_position_embeddings=False", not config.use_absolute_position_embeddings),
                ("use_mean_pooling", config.use_mean_pooling),
            ]
            if bad
        ]
        if unsupported:
            raise ValueError(
                "transformers' ViT has no equivalent of " + ", ".join(unsupported) + ": only a plain ViT "
                "(use_absolute_position_embeddings=True, no relative position bias, layer_scale_init_value=0) "
                "exports to ViTForMaskedImageModeling."
            )
        return ViTConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=int(config.hidden_size * config.mlp_ratio),
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            image_size=config.image_size,
            patch_size=config.patch_size,
            num_channels=config.num_channels,
            qkv_bias=config.qkv_bias,
            encoder_stride=config.encoder_stride,
        )
    if not config.patch_norm:
        raise ValueError("transformers' Swin always normalises the patch embedding: patch_norm=False does not export.")
    if config.layer_norm_eps != 1e-5:
        raise ValueError(
            f"layer_norm_eps={config.layer_norm_eps}: transformers' Swin keeps eps 1e-5 in its patch-embedding norm "
            "whatever its config says, so only layer_norm_eps=1e-5 exports exactly."
        )
    return SwinConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        embed_dim=config.embed_dim,
        depths=list(config.depths),
        num_heads=list(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        use_absolute_embeddings=config.use_absolute_position_embeddings,
        encoder_stride=config.encoder_stride,
    )


def export_to_transformers(model, output_dir):
    """Save our ViT/Swin MIM model as a transformers `ViTForMaskedImageModeling` / `SwinForMaskedImageModeling`
    checkpoint (the hub layout) and return it loaded through transformers' own `from_pretrained`."""
    from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

    config = model.config
    hf_config = transformers_config_from_simmim(config)
    ours = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if "simmim.encoder.mask_token" not in ours:
        raise ValueError("Only a model with a learned mask token (mask_token_type='learned') exports.")
    if config.backbone == "vit":
        sd = _rename(ours, _VIT_KEYS, _VIT_QKV, forward=False)
        model_class = ViTForMaskedImageModeling
    else:
        # transformers' Swin holds exactly one absolute position per patch, as ours does.
        pairs = _SWIN_KEYS + [("swin.embeddings.position_embeddings", "simmim.encoder.absolute_pos_embed")]
        sd = _rename(ours, pairs, _SWIN_QKV, forward=False)
        model_class = SwinForMaskedImageModeling
    hf_config.architectures = [model_class.__name__]
    os.makedirs(output_dir, exist_ok=True)
    hf_config.save_pretrained(output_dir)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
    return model_class.from_pretrained(output_dir)
