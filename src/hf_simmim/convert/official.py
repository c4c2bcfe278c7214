"""Official microsoft/SimMIM `.pth` checkpoints in: the architecture is inferred from the weights (and the pickled
yacs config when unpickling is allowed); what a checkpoint cannot tell can be overridden by keyword."""

import logging
import math
import os
import pickle
import re

import torch

from ..models.configuration_simmim import SimMIMConfig
from .common import DERIVED_BUFFERS, load_strict, save_with_processor

logger = logging.getLogger(__name__)


class UnsafeCheckpointError(RuntimeError):
    pass


def load_official_checkpoint(path, allow_unsafe_pickle=False):
    """Return `(state_dict, official_config_or_None)` from a microsoft/SimMIM checkpoint.

    Loads with `torch.load(weights_only=True)`. Training checkpoints also pickle a yacs config (and optimizer
    state); `weights_only` refuses those, and only `allow_unsafe_pickle=True` unpickles them (only do that for
    files you trust: unpickling runs code).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Official checkpoint {path!r} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path} holds pickled Python objects besides tensors (typically the yacs config and optimizer "
                f"state of an official training checkpoint), which torch.load(weights_only=True) refuses:\n  {error}\n"
                "Unpickling such a file can run arbitrary code. If you trust where it comes from, pass "
                "--allow-unsafe-pickle (allow_unsafe_pickle=True)."
            ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    official_config = None
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        official_config = checkpoint.get("config")
        state_dict = checkpoint["model"]
    elif isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise ValueError(f"{path} is not a SimMIM checkpoint: expected a dict with a 'model' state dict.")
    if not any(k.startswith("encoder.") for k in state_dict):
        raise ValueError(
            f"{path} has no 'encoder.*' weights: expected an official SimMIM pretraining checkpoint "
            "(keys 'encoder.*' and 'decoder.0.*')."
        )
    return state_dict, official_config


def _official_overrides(official_config):
    """Mask settings from an official yacs config, when the checkpoint carried one."""
    if official_config is None:
        return {}
    try:
        data = official_config["DATA"] if isinstance(official_config, dict) else official_config.DATA
        return {"mask_patch_size": int(data["MASK_PATCH_SIZE"]), "mask_ratio": float(data["MASK_RATIO"])}
    except (KeyError, AttributeError, TypeError):
        return {}


def config_from_official_state_dict(state_dict, **overrides):
    """Infer a `SimMIMConfig` from an official state dict (`encoder.*`, `decoder.0.*`)."""
    sd = state_dict
    proj = sd["encoder.patch_embed.proj.weight"]
    kwargs = dict(patch_size=proj.shape[-1], num_channels=proj.shape[1])
    if any(k.startswith("encoder.layers.") for k in sd):
        kwargs.update(_official_swin_architecture(sd, proj))
    elif any(k.startswith("encoder.blocks.") for k in sd):
        kwargs.update(_official_vit_architecture(sd, proj))
    else:
        raise ValueError("Cannot tell the backbone: the checkpoint has neither encoder.blocks.* (ViT) nor encoder.layers.* (Swin).")
    if "decoder.0.weight" in sd:
        stride = math.isqrt(sd["decoder.0.weight"].shape[0] // kwargs["num_channels"])
        kwargs["encoder_stride"] = stride
    if "image_size" not in kwargs and "image_size" not in overrides:
        raise ValueError(
            "The checkpoint does not tell the image size (no position embedding, relative position table or "
            "attention mask that depends on it): pass image_size (--image_size)."
        )
    kwargs.update({k: v for k, v in overrides.items() if k == "image_size"})
    if "mask_patch_size" not in overrides and kwargs["image_size"] % 32:
        kwargs["mask_patch_size"] = math.gcd(kwargs["image_size"], 32)
    kwargs.update(overrides)
    return SimMIMConfig(**kwargs)


def _count(sd, pattern):
    found = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _official_vit_architecture(sd, proj):
    hidden = proj.shape[0]
    depth = _count(sd, r"encoder\.blocks\.(\d+)\.")
    shared = "encoder.rel_pos_bias.relative_position_bias_table" in sd
    per_block = "encoder.blocks.0.attn.relative_position_bias_table" in sd
    table = sd.get("encoder.rel_pos_bias.relative_position_bias_table", sd.get("encoder.blocks.0.attn.relative_position_bias_table"))
    kwargs = dict(
        backbone="vit",
        hidden_size=hidden,
        num_hidden_layers=depth,
        mlp_ratio=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        qkv_bias="encoder.blocks.0.attn.q_bias" in sd or "encoder.blocks.0.attn.qkv.bias" in sd,
        use_absolute_position_embeddings="encoder.pos_embed" in sd,
        use_shared_relative_position_bias=shared,
        use_relative_position_bias=per_block,
        layer_scale_init_value=0.1 if "encoder.blocks.0.gamma_1" in sd else 0.0,
        use_mean_pooling="encoder.fc_norm.weight" in sd,
        drop_path_rate=0.1,
    )
    if table is not None:
        kwargs["num_attention_heads"] = table.shape[1]
        grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
    elif "encoder.pos_embed" in sd:
        grid = math.isqrt(sd["encoder.pos_embed"].shape[1] - 1)
    else:
        grid = None
    if "num_attention_heads" not in kwargs:
        kwargs["num_attention_heads"] = max(1, hidden // 64)
        logger.warning(
            "The checkpoint does not tell the number of attention heads (no relative position bias table); "
            "assuming hidden_size/64 = %d. Pass num_attention_heads to override.", kwargs["num_attention_heads"]
        )
    if grid is not None:
        kwargs["image_size"] = grid * proj.shape[-1]
    return kwargs


def _official_swin_architecture(sd, proj):
    num_stages = _count(sd, r"encoder\.layers\.(\d+)\.")
    depths = [_count(sd, rf"encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
    tables = [sd[f"encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(num_stages)]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    embed_dim = proj.shape[0]
    kwargs = dict(
        backbone="swin",
        embed_dim=embed_dim,
        depths=depths,
        num_heads=[t.shape[1] for t in tables],
        window_size=window,
        mlp_ratio=sd["encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="encoder.layers.0.blocks.0.attn.qkv.bias" in sd,
        use_absolute_position_embeddings="encoder.absolute_pos_embed" in sd,
        patch_norm="encoder.patch_embed.norm.weight" in sd,
        drop_path_rate=0.0,
    )
    grid = None
    if "encoder.absolute_pos_embed" in sd:
        grid = math.isqrt(sd["encoder.absolute_pos_embed"].shape[1])
    elif "encoder.layers.0.blocks.1.attn_mask" in sd:  # (num_windows, N, N) of stage 0
        grid = window * math.isqrt(sd["encoder.layers.0.blocks.1.attn_mask"].shape[0])
    else:  # the first stage whose window shrank to its grid tells that grid
        for i, table in enumerate(tables):
            stage_window = (math.isqrt(table.shape[0]) + 1) // 2
            if stage_window < window:
                grid = stage_window * 2**i
                break
    if grid is not None:
        kwargs["image_size"] = grid * proj.shape[-1]
    return kwargs


def convert_official_state_dict(state_dict):
    """Official keys -> ours. ViT q/v biases become one qkv bias with a zero key part (softmax ignores a key
    bias, so the function is unchanged); derived buffers are dropped."""
    out = {}
    for key, value in state_dict.items():
        if DERIVED_BUFFERS.search(key) or key.startswith("encoder.head."):
            continue
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            stem = key[: -len("q_bias")]
            v_bias = state_dict[stem + "v_bias"]
            value = torch.cat([value, torch.zeros_like(value), v_bias])
            key = stem + "qkv.bias"
        key = re.sub(r"^(encoder\.blocks\.\d+)\.attn\.relative_position_bias_table$", r"\1.rel_pos_bias.relative_position_bias_table", key)
        if key.startswith("encoder."):
            key = "simmim." + key
        out[key] = value
    return out


def convert_official_checkpoint(checkpoint_path, output_dir=None, allow_unsafe_pickle=False, **overrides):
    """Official `.pth` -> `SimMIMForMaskedImageModeling` (saved to `output_dir` when given)."""
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    state_dict, official_config = load_official_checkpoint(checkpoint_path, allow_unsafe_pickle)
    overrides = {**_official_overrides(official_config), **overrides}
    config = config_from_official_state_dict(state_dict, **overrides)
    model = SimMIMForMaskedImageModeling(config)
    load_strict(model, convert_official_state_dict(state_dict), "official checkpoint " + str(checkpoint_path))
    if output_dir is not None:
        save_with_processor(model, output_dir)
    return model
