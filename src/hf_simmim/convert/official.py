"""Official SimMIM `.pth` checkpoints in: microsoft/SimMIM's ViT and Swin, and microsoft/Swin-Transformer's SwinV2
(`SwinTransformerV2ForSimMIM`, with either spelling of its position-bias MLP: `cpb_mlp`, or `rpe_mlp` as in the
released SimMIM SwinV2 weights). The architecture is inferred from the weights (and the pickled yacs config when
unpickling is allowed); what a checkpoint cannot tell can be overridden by keyword.

The weights never tell the loss target: the two official SwinV2 settings (`MODEL.SIMMIM.NORM_TARGET.ENABLE` False
or True) save the same tensors. It comes from the pickled yacs config of a training checkpoint where there is one,
else from `norm_target="local"` (with `norm_target_patch_size`, official 47; CLI `--norm_target local`); the default
is the pixels, the official `config.py` default."""

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


def _node(config, name):
    """`config[name]` of a yacs config (a dict) or any object holding it as an attribute; None where it is absent."""
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def _official_overrides(official_config):
    """Mask settings and the SwinV2 normalised target from an official yacs config, when the checkpoint carried one."""
    overrides = {}
    data = _node(official_config, "DATA")
    try:
        overrides.update(mask_patch_size=int(data["MASK_PATCH_SIZE"]), mask_ratio=float(data["MASK_RATIO"]))
    except (KeyError, TypeError):
        pass
    norm_target = _node(_node(_node(official_config, "MODEL"), "SIMMIM"), "NORM_TARGET")
    if norm_target is not None:
        enabled = bool(_node(norm_target, "ENABLE"))
        overrides.update(norm_target="local" if enabled else None)
        if enabled:
            overrides.update(norm_target_patch_size=int(_node(norm_target, "PATCH_SIZE")))
    return overrides


def config_from_official_state_dict(state_dict, **overrides):
    """Infer a `SimMIMConfig` from an official state dict (`encoder.*`, `decoder.0.*`)."""
    sd = state_dict
    proj = sd["encoder.patch_embed.proj.weight"]
    kwargs = dict(patch_size=proj.shape[-1], num_channels=proj.shape[1])
    if any(k.startswith("encoder.layers.") for k in sd):
        kwargs.update(_official_swin_architecture(sd, proj, overrides.get("window_size")))
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


def _official_stage_window(sd, stage, v2):
    """The window stage `stage` attends in, from its first block's position tensors (Swin: the bias table; SwinV2:
    the coordinate table or relative position index buffers, None without them)."""
    attn = f"encoder.layers.{stage}.blocks.0.attn."
    if not v2:
        return (math.isqrt(sd[attn + "relative_position_bias_table"].shape[0]) + 1) // 2
    if attn + "relative_coords_table" in sd:
        return (sd[attn + "relative_coords_table"].shape[1] + 1) // 2
    if attn + "relative_position_index" in sd:
        return math.isqrt(sd[attn + "relative_position_index"].shape[0])
    return None


def _official_swin_grid(sd, window, stage_windows):
    """The stage-0 token grid: from the absolute position embedding, the stage-0 shift mask (windows per image), or
    the first stage whose window shrank to its grid; None when nothing tells it."""
    if "encoder.absolute_pos_embed" in sd:
        return math.isqrt(sd["encoder.absolute_pos_embed"].shape[1])
    if "encoder.layers.0.blocks.1.attn_mask" in sd:  # (num_windows, N, N) of stage 0
        return window * math.isqrt(sd["encoder.layers.0.blocks.1.attn_mask"].shape[0])
    for i, stage_window in enumerate(stage_windows):
        if stage_window is not None and stage_window < window:
            return stage_window * 2**i
    return None


def _official_swin_architecture(sd, proj, window_size=None):
    """Swin or SwinV2 (which has a logit scale per block) fields; `window_size` stands in where no tensor tells the
    window (a SwinV2 checkpoint without its buffers)."""
    v2 = "encoder.layers.0.blocks.0.attn.logit_scale" in sd
    num_stages = _count(sd, r"encoder\.layers\.(\d+)\.")
    depths = [_count(sd, rf"encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
    heads_key = "logit_scale" if v2 else "relative_position_bias_table"
    heads_dim = 0 if v2 else 1
    stage_windows = [_official_stage_window(sd, i, v2) for i in range(num_stages)]
    window = stage_windows[0] or window_size
    if window is None:
        raise ValueError(
            "The SwinV2 checkpoint holds no relative_coords_table or relative_position_index buffers, the only "
            "tensors that tell its window size: pass window_size (and image_size) (--window_size, --image_size)."
        )
    embed_dim = proj.shape[0]
    kwargs = dict(
        backbone="swinv2" if v2 else "swin",
        embed_dim=embed_dim,
        depths=depths,
        num_heads=[sd[f"encoder.layers.{i}.blocks.0.attn.{heads_key}"].shape[heads_dim] for i in range(num_stages)],
        window_size=window,
        mlp_ratio=sd["encoder.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias=f"encoder.layers.0.blocks.0.attn.{'q_bias' if v2 else 'qkv.bias'}" in sd,
        use_absolute_position_embeddings="encoder.absolute_pos_embed" in sd,
        patch_norm="encoder.patch_embed.norm.weight" in sd,
        # the official pretraining configs' stochastic depth (Swin: 0.0; SwinV2: 0.1)
        drop_path_rate=0.1 if v2 else 0.0,
    )
    grid = _official_swin_grid(sd, window, stage_windows)
    if grid is not None:
        kwargs["image_size"] = grid * proj.shape[-1]
    return kwargs


_VIT_PER_BLOCK_POSITION = re.compile(
    r"^(encoder\.blocks\.\d+)\.attn\.(relative_position_bias_table|relative_position_index)$"
)
_VIT_QV_BIAS = re.compile(r"^encoder\.blocks\.\d+\.attn\.[qv]_bias$")


def _our_key(key):
    """Our name of an official key: `simmim.` in front of the encoder's, a ViT's per-block position tensors under
    `rel_pos_bias`, the SwinV2 position-bias MLP as `cpb_mlp` (the released SimMIM SwinV2 weights call it `rpe_mlp`;
    the official loader renames it too)."""
    key = _VIT_PER_BLOCK_POSITION.sub(r"\1.rel_pos_bias.\2", key.replace(".attn.rpe_mlp.", ".attn.cpb_mlp."))
    return "simmim." + key if key.startswith("encoder.") else key


def convert_official_state_dict(state_dict):
    """Official keys -> ours. ViT q/v biases become one qkv bias with a zero key part (softmax ignores a key
    bias, so the function is unchanged); SwinV2 keeps its own q/v biases (its keys are normalised: a key bias would
    change them); derived buffers are dropped."""
    out = {}
    for key, value in state_dict.items():
        if DERIVED_BUFFERS.search(key) or key.startswith("encoder.head."):
            continue
        if _VIT_QV_BIAS.match(key):
            if key.endswith("v_bias"):
                continue
            stem = key[: -len("q_bias")]
            value = torch.cat([value, torch.zeros_like(value), state_dict[stem + "v_bias"]])
            key = stem + "qkv.bias"
        out[_our_key(key)] = value
    return out


def check_derived_buffers(model, state_dict, source):
    """The buffers an official checkpoint stores (relative position indices, SwinV2 coordinate tables, shift masks)
    must equal the ones `model` computes from its config: a difference means the config is not the checkpoint's (an
    image size, window or pretrained window it does not have)."""
    ours = dict(model.named_buffers())
    for key, value in state_dict.items():
        if not DERIVED_BUFFERS.search(key):
            continue
        computed = ours.get(_our_key(key))
        if computed is None or computed.shape != value.shape or not torch.equal(computed.to(value.dtype), value):
            config = model.config
            geometry = [f"image_size={config.image_size}"]
            if config.backbone != "vit":
                geometry.append(f"window_size={config.window_size}")
            if config.backbone == "swinv2":
                geometry.append(f"pretrained_window_sizes={config.pretrained_window_sizes}")
            raise ValueError(
                f"{source}: {key} is not what {', '.join(geometry)} give: pass the checkpoint's values (--image_size, "
                "--window_size)."
            )


def convert_official_checkpoint(checkpoint_path, output_dir=None, allow_unsafe_pickle=False, **overrides):
    """Official `.pth` -> `SimMIMForMaskedImageModeling` (saved to `output_dir` when given)."""
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    state_dict, official_config = load_official_checkpoint(checkpoint_path, allow_unsafe_pickle)
    overrides = {**_official_overrides(official_config), **overrides}
    config = config_from_official_state_dict(state_dict, **overrides)
    model = SimMIMForMaskedImageModeling(config)
    source = "official checkpoint " + str(checkpoint_path)
    load_strict(model, convert_official_state_dict(state_dict), source)
    check_derived_buffers(model, state_dict, source)
    if output_dir is not None:
        save_with_processor(model, output_dir)
    return model
