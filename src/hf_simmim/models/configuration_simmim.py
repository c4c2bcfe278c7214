"""SimMIMConfig: one configuration for the encoder (ViT, Swin or SwinV2) and the SimMIM head, plus named presets.

Every field is checked when the config is built, so a bad combination fails here with a message that names the
field and the fix, never later with a shape error inside torch.
"""

import copy

from transformers import PreTrainedConfig

from .masking import check_mask_strategy

BACKBONES = ("vit", "swin", "swinv2")
# The hierarchical backbones: patch merging stages of shifted windows (Swin v1 and v2 share their geometry fields).
SWIN_BACKBONES = ("swin", "swinv2")
_SWIN_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "patch_norm")
# The fields that only some backbones read; `to_dict` (and so config.json) keeps those of the config's backbone.
BACKBONE_FIELDS = {
    "vit": (
        "num_hidden_layers",
        "num_attention_heads",
        "use_relative_position_bias",
        "use_shared_relative_position_bias",
        "layer_scale_init_value",
        "use_mean_pooling",
    ),
    "swin": _SWIN_FIELDS,
    "swinv2": _SWIN_FIELDS + ("pretrained_window_sizes",),
}
# Geometry a field left unset (None) takes for each backbone: the paper's ViT-B/16 at 224 px and Swin (v1 and v2) at
# 192 px. Saved configs always carry the resolved values, so these never change a checkpoint.
BACKBONE_DEFAULTS = {
    "vit": dict(image_size=224, patch_size=16),
    "swin": dict(image_size=192, patch_size=4),
    "swinv2": dict(image_size=192, patch_size=4),
}
LOSS_TYPES = ("l1", "l2", "smooth_l1")
MASK_TOKEN_TYPES = ("learned", "zeros", "noise")
# What the loss compares the reconstruction with (`norm_target`): the pixels (None), or the pixels standardised per
# channel over each pixel's `norm_target_patch_size` neighbourhood ("local", the official SwinV2 SimMIM
# `NORM_TARGET`) or inside each non-overlapping `patch_size` patch ("patch").
NORM_TARGETS = (None, "local", "patch")


def check_norm_target(norm_target):
    """The `NORM_TARGETS` entry `norm_target` names; booleans as configs before "local" existed saved them (False:
    the pixels, True: "patch")."""
    if norm_target is False:
        return None
    if norm_target is True:
        return "patch"
    if norm_target not in NORM_TARGETS:
        raise ValueError(
            f"norm_target={norm_target!r} is not supported: use None (the pixels), 'local' (the official SwinV2 "
            "SimMIM normalised target) or 'patch'."
        )
    return norm_target


def stage_windows(image_size, patch_size, window_size, num_stages):
    """The window each Swin stage attends in: `window_size`, or the stage's whole token grid where that is not larger
    (as the official code: one window, no shift)."""
    grid = image_size // patch_size
    return [min(window_size, grid // 2**stage) for stage in range(num_stages)]


def _stage_windows_of(fields):
    return stage_windows(fields["image_size"], fields["patch_size"], fields["window_size"], len(fields["depths"]))


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer.")


class SimMIMConfig(PreTrainedConfig):
    r"""Configuration of a SimMIM encoder and its masked-image-modeling head.

    Args:
        backbone (`str`, defaults to `"vit"`): `"vit"` (plain ViT or the official SimMIM ViT variant), `"swin"`
            (Swin Transformer v1) or `"swinv2"` (Swin Transformer v2, as microsoft/Swin-Transformer's SimMIM).
        image_size (`int`, *optional*), patch_size (`int`, *optional*): input geometry; unset, the backbone's
            (ViT: 224 and 16; Swin and SwinV2: 192 and 4, the paper's).
        num_channels (`int`): input channels.
        hidden_size, num_hidden_layers, num_attention_heads: ViT width, depth and heads.
        embed_dim, depths, num_heads, window_size: Swin (v1 and v2) stage-0 width, blocks and heads per stage, window
            size. For Swin, `hidden_size` is derived: `embed_dim * 2 ** (len(depths) - 1)`.
        pretrained_window_sizes (`list[int]`, *optional*): SwinV2 only: per stage, the window the continuous position
            bias was trained with (0: this config's own window); its coordinates are scaled by that window, so a
            model pretrained with window 12 fine-tunes with window 14 (official: `[12, 12, 12, 6]`). Unset, zeros;
            loading a SwinV2 checkpoint with another `window_size` or `image_size` sets it to the checkpoint's windows.
        mlp_ratio (`float`): MLP hidden width over the block width.
        qkv_bias (`bool`): biases on the query/key/value projection (the official ViT has q and v biases only; a
            key bias shifts every logit of a query by the same amount, so softmax ignores it).
        hidden_act (`str`): MLP activation (`"gelu"`, the exact erf form, as the official code).
        hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate (`float`): regularisation.
        layer_norm_eps (`float`, *optional*): defaults to 1e-6 for ViT and 1e-5 for Swin, as the official code.
        use_absolute_position_embeddings (`bool`): learned absolute position embeddings (plain ViT: True).
        use_relative_position_bias (`bool`): ViT only: one relative position bias table per block.
        use_shared_relative_position_bias (`bool`): ViT only: one relative position bias table shared by all blocks
            (the official SimMIM ViT).
        layer_scale_init_value (`float`): ViT only: layer scale init (0 disables layer scale; official: 0.1).
        use_mean_pooling (`bool`): ViT only: pool by averaging patch tokens followed by `fc_norm` (the official
            fine-tuning head) instead of the final norm. Image classification always uses it for ViT.
        patch_norm (`bool`): Swin only: LayerNorm after the patch embedding.
        mask_patch_size (`int`): side of the square masked together, in pixels (official: 32).
        mask_ratio (`float`): fraction of mask patches that are masked (official: 0.6; `grid` needs 0.5).
        mask_strategy (`str`): how masks are drawn, one of `MASK_STRATEGIES` (see `models/masking.py`):
            `"random_block"` (the paper: random `mask_patch_size` squares), `"random_patch"`, `"grid"`,
            `"block_wise"` or `"center"`.
        encoder_stride (`int`, *optional*): derived: total downsampling of the encoder (ViT: patch_size; Swin:
            patch_size * 2 ** (len(depths) - 1)). The decoder upsamples by exactly this factor.
        mask_token_type (`str`): what replaces masked patch embeddings: `"learned"` (the paper), `"zeros"` or
            `"noise"` (standard Gaussian).
        loss_type (`str`): `"l1"` (the paper), `"l2"` or `"smooth_l1"`.
        norm_target (`str`, *optional*): what the loss compares the reconstruction with: None, the pixels (the paper);
            `"local"`, each pixel standardised per channel over its `norm_target_patch_size` neighbourhood with the
            unbiased variance (the official SwinV2 SimMIM `NORM_TARGET`); `"patch"`, standardised per channel inside
            each non-overlapping `patch_size` patch. `True` / `False` (older configs) mean `"patch"` / None.
        norm_target_patch_size (`int`): side of the `"local"` neighbourhood, odd (official: 47).
        initializer_range (`float`): std of the truncated normal init.
    """

    model_type = "simmim"

    def __init__(
        self,
        backbone="vit",
        image_size=None,
        patch_size=None,
        num_channels=3,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        embed_dim=128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_size=6,
        mlp_ratio=4.0,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        layer_norm_eps=None,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        use_mean_pooling=False,
        patch_norm=True,
        pretrained_window_sizes=None,
        mask_patch_size=32,
        mask_ratio=0.6,
        mask_strategy="random_block",
        encoder_stride=None,
        mask_token_type="learned",
        loss_type="l1",
        norm_target=None,
        norm_target_patch_size=47,
        initializer_range=0.02,
        **kwargs,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone={backbone!r} is not supported: use one of {BACKBONES}.")
        self.backbone = backbone
        defaults = BACKBONE_DEFAULTS[backbone]
        self.image_size = defaults["image_size"] if image_size is None else image_size
        self.patch_size = defaults["patch_size"] if patch_size is None else patch_size
        self.num_channels = num_channels
        self._set_vit_fields(
            num_hidden_layers, num_attention_heads, use_relative_position_bias, use_shared_relative_position_bias,
            layer_scale_init_value, use_mean_pooling,
        )
        self._set_swin_fields(embed_dim, depths, num_heads, window_size, patch_norm, pretrained_window_sizes)
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.use_absolute_position_embeddings = use_absolute_position_embeddings
        self._set_masked_image_modeling_fields(
            mask_patch_size, mask_ratio, mask_strategy, mask_token_type, loss_type, norm_target, norm_target_patch_size
        )
        self.initializer_range = initializer_range
        self._validate_choices()
        self._set_derived_fields(hidden_size, layer_norm_eps, encoder_stride)
        super().__init__(**kwargs)
        self._validate_geometry()

    def _set_vit_fields(
        self, num_hidden_layers, num_attention_heads, use_relative_position_bias, use_shared_relative_position_bias,
        layer_scale_init_value, use_mean_pooling,
    ):
        """The fields only the ViT encoder reads (`BACKBONE_FIELDS["vit"]`)."""
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_relative_position_bias = use_relative_position_bias
        self.use_shared_relative_position_bias = use_shared_relative_position_bias
        self.layer_scale_init_value = layer_scale_init_value
        self.use_mean_pooling = use_mean_pooling

    def _set_masked_image_modeling_fields(
        self, mask_patch_size, mask_ratio, mask_strategy, mask_token_type, loss_type, norm_target,
        norm_target_patch_size,
    ):
        """What is masked, what fills it, and the loss on it."""
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.mask_strategy = mask_strategy
        self.mask_token_type = mask_token_type
        self.loss_type = loss_type
        self.norm_target = check_norm_target(norm_target)
        self.norm_target_patch_size = norm_target_patch_size

    def _set_swin_fields(self, embed_dim, depths, num_heads, window_size, patch_norm, pretrained_window_sizes):
        """The fields only the Swin encoders read (`BACKBONE_FIELDS["swin"]`, `BACKBONE_FIELDS["swinv2"]`)."""
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.patch_norm = patch_norm
        self.pretrained_window_sizes = (
            [0] * len(self.depths) if pretrained_window_sizes is None else list(pretrained_window_sizes)
        )

    # ------------------------------------------------------------------ derived values
    @property
    def grid_size(self):
        """Side of the patch-token grid after the patch embedding."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2

    @property
    def feature_grid_size(self):
        """Side of the encoder's final feature map (what the decoder sees)."""
        return self.image_size // self.encoder_stride

    def _set_derived_fields(self, hidden_size, layer_norm_eps, encoder_stride):
        """Swin's width after the last stage, the backbone's LayerNorm eps (as the official code), the stride."""
        swin = self.backbone in SWIN_BACKBONES
        self.hidden_size = self.embed_dim * 2 ** (len(self.depths) - 1) if swin else hidden_size
        if layer_norm_eps is None:
            layer_norm_eps = 1e-6 if self.backbone == "vit" else 1e-5
        self.layer_norm_eps = layer_norm_eps
        derived_stride = self._derived_encoder_stride()
        if encoder_stride is not None and encoder_stride != derived_stride:
            raise ValueError(
                f"encoder_stride={encoder_stride} does not match the encoder's total downsampling {derived_stride} "
                f"(backbone={self.backbone!r}, patch_size={self.patch_size}"
                + (f", {len(self.depths)} stages" if swin else "")
                + "): the decoder would reconstruct an image of the wrong size. Leave encoder_stride unset; it is "
                "derived from the backbone."
            )
        self.encoder_stride = derived_stride

    def _derived_encoder_stride(self):
        if self.backbone in SWIN_BACKBONES:
            return self.patch_size * 2 ** (len(self.depths) - 1)
        return self.patch_size

    # ------------------------------------------------------------------ validation
    def _validate_choices(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not supported: use one of {LOSS_TYPES}.")
        if self.mask_token_type not in MASK_TOKEN_TYPES:
            raise ValueError(
                f"mask_token_type={self.mask_token_type!r} is not supported: use one of {MASK_TOKEN_TYPES}."
            )
        check_mask_strategy(self.mask_strategy, self.mask_ratio)
        names = ("image_size", "patch_size", "mask_patch_size", "num_channels")
        if self.backbone == "vit":
            names += ("num_hidden_layers", "num_attention_heads")
        else:
            names += ("embed_dim", "window_size")
        for name in names:
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("norm_target_patch_size", self.norm_target_patch_size)
        if self.norm_target == "local" and self.norm_target_patch_size % 2 == 0:
            raise ValueError(
                f"norm_target_patch_size={self.norm_target_patch_size} must be odd (the official normalised target "
                "centres the neighbourhood on each pixel; official: 47)."
            )
        if self.backbone in SWIN_BACKBONES:
            self._validate_stages()

    def _validate_stages(self):
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths={self.depths} and num_heads={self.num_heads} must have one entry per Swin stage "
                "(the same length, at least one stage)."
            )
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            _check_positive_int(f"depths[{stage}]", depth)
            _check_positive_int(f"num_heads[{stage}]", heads)
        windows = self.pretrained_window_sizes
        valid = len(windows) == len(self.depths) and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows
        )
        if self.backbone == "swinv2" and not valid:
            raise ValueError(
                f"pretrained_window_sizes={windows} must hold one window size >= 0 per stage ({len(self.depths)} "
                "stages; 0: the stage's own window)."
            )

    def _validate_geometry(self):
        if self.backbone == "vit":
            _check_positive_int("hidden_size", self.hidden_size)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}: choose an "
                "image_size divisible by patch_size."
            )
        if self.image_size % self.mask_patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of mask_patch_size={self.mask_patch_size}: "
                f"choose an image_size divisible by mask_patch_size (e.g. {self.mask_patch_size * max(1, round(self.image_size / self.mask_patch_size))})."
            )
        if self.mask_patch_size % self.patch_size:
            raise ValueError(
                f"mask_patch_size={self.mask_patch_size} is not a multiple of patch_size={self.patch_size}: a "
                "masked square must cover whole patches; choose mask_patch_size divisible by patch_size."
            )
        if self.image_size % self.encoder_stride:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of the encoder stride {self.encoder_stride} "
                f"(patch_size x 2^(stages-1)): choose an image_size divisible by {self.encoder_stride}."
            )
        if self.backbone == "vit":
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}."
                )
        else:
            self._validate_stage_geometry()

    def _validate_stage_geometry(self):
        for stage, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**stage
            if dim % heads:
                raise ValueError(
                    f"Swin stage {stage} has width embed_dim*2^{stage}={dim}, not divisible by "
                    f"num_heads[{stage}]={heads}."
                )
        for stage in range(len(self.depths)):
            grid = self.grid_size // 2**stage
            if grid > self.window_size and grid % self.window_size:
                raise ValueError(
                    f"window_size={self.window_size} does not divide the {grid}x{grid} token grid of Swin stage "
                    f"{stage} (image_size={self.image_size}, patch_size={self.patch_size}): choose a window "
                    "size that divides every stage's grid, or an image_size that makes the grids divisible."
                )

    def to_dict(self):
        output = super().to_dict()
        output["depths"] = list(self.depths)
        output["num_heads"] = list(self.num_heads)
        if "pretrained_window_sizes" in output:
            output["pretrained_window_sizes"] = list(self.pretrained_window_sizes)
        own = set(BACKBONE_FIELDS.get(self.backbone, ()))
        for names in BACKBONE_FIELDS.values():
            for name in set(names) - own:
                output.pop(name, None)
        return output

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers' `from_dict` (what `from_pretrained` calls with its keyword overrides), plus, for SwinV2 loaded
        at another window or image size than saved without `pretrained_window_sizes`: the windows the checkpoint was
        trained with become its `pretrained_window_sizes`, as the official fine-tuning config sets them
        (`[12, 12, 12, 6]` after pretraining with window 12 at 192 px), so the continuous position bias sees the
        offsets it learned at the coordinates it learned them. A checkpoint that already has pretrained windows keeps
        them. The overridden config is validated as a new one is."""
        if config_dict.get("backbone") == "swinv2" and "pretrained_window_sizes" not in kwargs:
            trained = _stage_windows_of(config_dict)
            if _stage_windows_of({**config_dict, **kwargs}) != trained and not any(
                config_dict.get("pretrained_window_sizes") or ()
            ):
                kwargs["pretrained_window_sizes"] = trained
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.norm_target = check_norm_target(config.norm_target)
        config._validate_choices()
        config._validate_geometry()
        return loaded

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name, **overrides):
        """Build a config from a named preset (see `PRESETS`); keyword arguments override preset fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(sorted(PRESETS))}.")
        fields = copy.deepcopy(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)


_SIMMIM_VIT = dict(
    backbone="vit",
    use_absolute_position_embeddings=False,
    use_relative_position_bias=False,
    use_shared_relative_position_bias=True,
    layer_scale_init_value=0.1,
    drop_path_rate=0.1,
)
_SWIN = dict(backbone="swin", patch_size=4, use_absolute_position_embeddings=False, drop_path_rate=0.0)
# microsoft/Swin-Transformer configs/simmim/*swinv2_base*.yaml: SwinV2-B, pretrained at 192 px with window 12 and the
# normalised target, fine-tuned at 224 px with window 14.
_SWINV2 = dict(backbone="swinv2", patch_size=4, use_absolute_position_embeddings=False, drop_path_rate=0.1)
_SWINV2_BASE = dict(_SWINV2, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])

PRESETS = {
    # The paper's models.
    "vit-base-patch16-224": dict(
        _SIMMIM_VIT, image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12
    ),
    "swin-base-window6-192": dict(
        _SWIN, image_size=192, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=6
    ),
    "swin-large-window12-192": dict(
        _SWIN, image_size=192, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12
    ),
    "swinv2-base-window12-192": dict(
        _SWINV2_BASE, image_size=192, window_size=12, norm_target="local", norm_target_patch_size=47
    ),
    "swinv2-base-window14-224": dict(
        _SWINV2_BASE, image_size=224, window_size=14, pretrained_window_sizes=[12, 12, 12, 6]
    ),
    # Small models for CIFAR-sized images (32 px; mask_patch_size 8 gives a 4x4 grid of masked squares).
    "vit-tiny-patch4-32": dict(
        _SIMMIM_VIT,
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        mask_patch_size=8,
    ),
    # Tiny presets: CPU tests and the default laptop run.
    "vit-tiny-test": dict(
        _SIMMIM_VIT,
        image_size=32,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mask_patch_size=8,
        drop_path_rate=0.0,
    ),
    "swin-tiny-test": dict(
        _SWIN,
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=4,
        mask_patch_size=8,
    ),
    # Fine-tunes at a larger window as the official SwinV2 does (--config_overrides window_size=8: the second stage's
    # 8x8 grid becomes one unshifted window, pretrained_window_sizes [4, 4]).
    "swinv2-tiny-test": dict(
        _SWINV2,
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[1, 2],
        window_size=4,
        mask_patch_size=8,
        drop_path_rate=0.0,
    ),
}
