"""SimMIMConfig: one configuration for the encoder (ViT, Swin, SwinV2, ResNet or ConvNeXt V1/V2) and the SimMIM
head, plus named presets.

Every field is checked when the config is built, so a bad combination fails here with a message that names the
field and the fix, never later with a shape error inside torch.
"""

import copy

from transformers import PreTrainedConfig

from .masking import check_mask_strategy

BACKBONES = ("vit", "swin", "swinv2", "resnet", "convnext")
# The hierarchical backbones: patch merging stages of shifted windows (Swin v1 and v2 share their geometry fields).
SWIN_BACKBONES = ("swin", "swinv2")
# The convolutional backbones (transformers' ResNetModel and ConvNextModel / ConvNextV2Model layouts).
CNN_BACKBONES = ("resnet", "convnext")
_SWIN_FIELDS = ("embed_dim", "depths", "num_heads", "window_size", "patch_norm")
_CNN_FIELDS = ("hidden_sizes", "depths", "conv_masking", "decoder_type", "decoder_hidden_size")
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
    "resnet": _CNN_FIELDS + ("embedding_size", "layer_type"),
    "convnext": _CNN_FIELDS + ("convnext_version", "layer_scale_init_value", "layer_decay_type"),
}
# What a field left unset (None) takes for each backbone: the paper's ViT-B/16 at 224 px and Swin (v1 and v2) at
# 192 px; ResNet-50 and ConvNeXt-T at 224 px (transformers' ResNetConfig / ConvNextConfig). LayerNorm eps as the
# official code (ConvNeXt: the head's norm; ResNet has none). Saved configs always carry the resolved values, so these
# never change a checkpoint.
_SWIN_DEPTHS = [2, 2, 18, 2]
BACKBONE_DEFAULTS = {
    "vit": dict(image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, depths=_SWIN_DEPTHS),
    "swin": dict(image_size=192, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-5, depths=_SWIN_DEPTHS),
    "swinv2": dict(image_size=192, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-5, depths=_SWIN_DEPTHS),
    "resnet": dict(
        image_size=224, patch_size=4, hidden_act="relu", layer_norm_eps=1e-5, depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
    ),
    "convnext": dict(
        image_size=224, patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6, depths=[3, 3, 9, 3],
        hidden_sizes=[96, 192, 384, 768],
    ),
}
# Layer scale init when unset: the official SimMIM ViT's 0.1, ConvNeXt V1's 1e-6; ConvNeXt V2 has none (GRN).
LAYER_SCALE_DEFAULTS = {"vit": 0.1, ("convnext", 1): 1e-6, ("convnext", 2): 0.0}
LOSS_TYPES = ("l1", "l2", "smooth_l1")
MASK_TOKEN_TYPES = ("learned", "zeros", "noise")
# What the loss compares the reconstruction with (`norm_target`): the pixels (None), or the pixels standardised per
# channel over each pixel's `norm_target_patch_size` neighbourhood ("local", the official SwinV2 SimMIM
# `NORM_TARGET`) or inside each non-overlapping `patch_size` patch ("patch"), or each non-overlapping
# `mask_patch_size` square standardised over its pixels and channels together ("mask_patch", SparK's and ConvNeXt
# V2 FCMAE's normalised target at their 32 px).
NORM_TARGETS = (None, "local", "patch", "mask_patch")
# How a convolutional encoder hides what is under the mask (see `modeling_conv_masking`), and the decoders.
CONV_MASKING_MODES = ("token", "sparse")
DECODER_TYPES = ("simmim", "hierarchical")
RESNET_LAYER_TYPES = ("bottleneck", "basic")
# ResNet's stem (7x7 stride-2 convolution + stride-2 max pooling) always downsamples by 4.
RESNET_STEM_STRIDE = 4
CONVNEXT_VERSIONS = (1, 2)
LAYER_DECAY_TYPES = ("group", "single")
# The official ConvNeXt "group" layer decay: 12 groups for depths [3, 3, 27, 3] (ConvNeXt optim_factory).
GROUP_MAX_STAGE3_DEPTH = 27


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
            "SimMIM normalised target), 'patch' or 'mask_patch' (SparK's and FCMAE's normalised target)."
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


def _check_stage_list(name, values):
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name}={values!r} must be a list with one positive integer per stage.")
    for stage, value in enumerate(values):
        _check_positive_int(f"{name}[{stage}]", value)


def check_conv_encoder_config(config):
    """The fields both CNN encoders read: the masking mode and one depth and width per stage."""
    if config.conv_masking not in CONV_MASKING_MODES:
        raise ValueError(f"conv_masking={config.conv_masking!r} is not supported: use one of {CONV_MASKING_MODES}.")
    _check_stage_list("depths", config.depths)
    _check_stage_list("hidden_sizes", config.hidden_sizes)
    if len(config.depths) != len(config.hidden_sizes):
        raise ValueError(
            f"depths={config.depths} and hidden_sizes={config.hidden_sizes} must have one entry per stage (the same "
            "length)."
        )


def check_resnet_config(config):
    if config.layer_type not in RESNET_LAYER_TYPES:
        raise ValueError(f"layer_type={config.layer_type!r} is not supported: use one of {RESNET_LAYER_TYPES}.")
    _check_positive_int("embedding_size", config.embedding_size)


def check_convnext_config(config):
    if config.convnext_version not in CONVNEXT_VERSIONS:
        raise ValueError(f"convnext_version={config.convnext_version!r} is not supported: use 1 or 2.")
    if config.convnext_version == 2 and config.layer_scale_init_value:
        raise ValueError(
            f"layer_scale_init_value={config.layer_scale_init_value} with convnext_version=2: ConvNeXt V2 has no "
            "layer scale (GRN replaces it); set layer_scale_init_value=0."
        )
    if config.layer_decay_type not in LAYER_DECAY_TYPES:
        raise ValueError(
            f"layer_decay_type={config.layer_decay_type!r} is not supported: use one of {LAYER_DECAY_TYPES}."
        )
    if config.layer_decay_type == "group" and (len(config.depths) != 4 or config.depths[2] > GROUP_MAX_STAGE3_DEPTH):
        raise ValueError(
            f"layer_decay_type='group' with depths={config.depths}: the official grouping (12 groups of three blocks "
            f"for depths [3, 3, 27, 3]) needs 4 stages and at most {GROUP_MAX_STAGE3_DEPTH} blocks in the third; use "
            "layer_decay_type='single' (one id per block, ConvNeXt V2's default)."
        )


def hierarchical_decoder_blocks(config):
    """The number of 2x upsampling blocks of the hierarchical decoder, `log2(encoder_stride)`, checked: the stride is
    a power of 2 with at least one block per stage, and `decoder_hidden_size` halves down to the pixels."""
    stride, width = config.encoder_stride, config.decoder_hidden_size
    _check_positive_int("decoder_hidden_size", width)
    num_blocks = stride.bit_length() - 1
    if 2**num_blocks != stride or num_blocks < len(config.hidden_sizes):
        raise ValueError(
            f"decoder_type='hierarchical' needs an encoder stride that is a power of 2 of at least 2 ** stages; got "
            f"encoder_stride={stride} with {len(config.hidden_sizes)} stages: choose a patch_size that is a power of "
            "2 (at least 2)."
        )
    if width % stride:
        raise ValueError(
            f"decoder_hidden_size={width} must be divisible by encoder_stride={stride}: the hierarchical decoder "
            f"halves its width at each of its {num_blocks} 2x upsamplings (SparK: 768)."
        )
    return num_blocks


class SimMIMConfig(PreTrainedConfig):
    r"""Configuration of a SimMIM encoder and its masked-image-modeling head.

    Args:
        backbone (`str`, defaults to `"vit"`): `"vit"` (plain ViT or the official SimMIM ViT variant), `"swin"`
            (Swin Transformer v1), `"swinv2"` (Swin Transformer v2, as microsoft/Swin-Transformer's SimMIM),
            `"resnet"` (transformers' ResNet) or `"convnext"` (ConvNeXt V1, or V2 with `convnext_version=2`).
        image_size (`int`, *optional*), patch_size (`int`, *optional*): input geometry; unset, the backbone's
            (ViT: 224 and 16; Swin and SwinV2: 192 and 4, the paper's; ResNet and ConvNeXt: 224 and 4). For the CNNs,
            `patch_size` is the stem's stride (ResNet: always 4; ConvNeXt: its patchify kernel): the mask is given per
            `patch_size` patch, as for the transformers.
        num_channels (`int`): input channels.
        hidden_size, num_hidden_layers, num_attention_heads: ViT width, depth and heads.
        embed_dim, depths, num_heads, window_size: Swin (v1 and v2) stage-0 width, blocks and heads per stage, window
            size. For Swin, `hidden_size` is derived: `embed_dim * 2 ** (len(depths) - 1)`.
        pretrained_window_sizes (`list[int]`, *optional*): SwinV2 only: per stage, the window the continuous position
            bias was trained with (0: this config's own window); its coordinates are scaled by that window, so a
            model pretrained with window 12 fine-tunes with window 14 (official: `[12, 12, 12, 6]`). Unset, zeros;
            loading a SwinV2 checkpoint with another `window_size` or `image_size` sets it to the checkpoint's windows.
        hidden_sizes (`list[int]`, *optional*), depths: ResNet and ConvNeXt: output width and number of layers of
            each stage (unset: ResNet-50's `[256, 512, 1024, 2048]` and `[3, 4, 6, 3]`, ConvNeXt-T's
            `[96, 192, 384, 768]` and `[3, 3, 9, 3]`). `hidden_size` is derived: `hidden_sizes[-1]`.
        embedding_size (`int`): ResNet only: the stem's width (ResNet-50: 64).
        layer_type (`str`): ResNet only: `"bottleneck"` (ResNet-50 and deeper) or `"basic"` (ResNet-18/34).
        convnext_version (`int`): ConvNeXt only: 1 (layer scale) or 2 (GRN, no layer scale).
        layer_decay_type (`str`): ConvNeXt only: layer ids of layer-wise learning-rate decay in fine-tuning:
            `"single"` (one per block, ConvNeXt V2's default) or `"group"` (12 groups, ConvNeXt V1's; 4 stages).
        conv_masking (`str`): ResNet and ConvNeXt: `"token"` (masked pixels zeroed and the mask token at the stem
            output, SimMIM as for transformers) or `"sparse"` (additionally every feature map held at 0 under the
            mask, normalisation over visible positions: SparK's and FCMAE's masked convolution). See
            `modeling_conv_masking`.
        decoder_type (`str`): ResNet and ConvNeXt: `"simmim"` (SimMIM's 1x1 convolution + PixelShuffle on the final
            map) or `"hierarchical"` (SparK's light decoder over every stage's output). `"sparse"` needs
            `"hierarchical"`: masked positions hold nothing the one-layer head could fill a masked square from.
        decoder_hidden_size (`int`): width of the hierarchical decoder's first block, halved at each 2x upsampling
            (SparK: 768); divisible by the encoder stride.
        mlp_ratio (`float`): MLP hidden width over the block width.
        qkv_bias (`bool`): biases on the query/key/value projection (the official ViT has q and v biases only; a
            key bias shifts every logit of a query by the same amount, so softmax ignores it).
        hidden_act (`str`, *optional*): activation (`"gelu"`, the exact erf form, as the official code; unset:
            `"relu"` for ResNet, `"gelu"` for the others).
        hidden_dropout_prob, attention_probs_dropout_prob, drop_path_rate (`float`): regularisation (ResNet reads
            `drop_path_rate` only, as timm's ResNet: no dropout).
        layer_norm_eps (`float`, *optional*): defaults to 1e-6 for ViT and ConvNeXt (the eps of ConvNeXt's head
            norm; its other norms keep 1e-6 as transformers and the official code) and 1e-5 for Swin.
        use_absolute_position_embeddings (`bool`): learned absolute position embeddings (plain ViT: True).
        use_relative_position_bias (`bool`): ViT only: one relative position bias table per block.
        use_shared_relative_position_bias (`bool`): ViT only: one relative position bias table shared by all blocks
            (the official SimMIM ViT).
        layer_scale_init_value (`float`, *optional*): ViT and ConvNeXt: layer scale init (0 disables layer scale;
            unset: 0.1 for ViT, the official SimMIM's; 1e-6 for ConvNeXt V1; 0 for ConvNeXt V2, which has none).
        use_mean_pooling (`bool`): ViT only: pool by averaging patch tokens followed by `fc_norm` (the official
            fine-tuning head) instead of the final norm. Image classification always uses it for ViT.
        patch_norm (`bool`): Swin only: LayerNorm after the patch embedding.
        mask_patch_size (`int`): side of the square masked together, in pixels (official: 32).
        mask_ratio (`float`): fraction of mask patches that are masked (official: 0.6; `grid` needs 0.5).
        mask_strategy (`str`): how masks are drawn, one of `MASK_STRATEGIES` (see `models/masking.py`):
            `"random_block"` (the paper: random `mask_patch_size` squares), `"random_patch"`, `"grid"`,
            `"block_wise"` or `"center"`.
        encoder_stride (`int`, *optional*): derived: total downsampling of the encoder (ViT: patch_size; the others:
            patch_size * 2 ** (len(depths) - 1)). The decoder upsamples by exactly this factor.
        mask_token_type (`str`): what replaces masked patch embeddings: `"learned"` (the paper), `"zeros"` or
            `"noise"` (standard Gaussian).
        loss_type (`str`): `"l1"` (the paper), `"l2"` (SparK, FCMAE) or `"smooth_l1"`.
        norm_target (`str`, *optional*): what the loss compares the reconstruction with: None, the pixels (the paper);
            `"local"`, each pixel standardised per channel over its `norm_target_patch_size` neighbourhood with the
            unbiased variance (the official SwinV2 SimMIM `NORM_TARGET`); `"patch"`, standardised per channel inside
            each non-overlapping `patch_size` patch; `"mask_patch"`, each non-overlapping `mask_patch_size` square
            standardised over its pixels and channels together with the unbiased variance (SparK's and FCMAE's
            `norm_pix_loss`, at their 32 px). `True` / `False` (older configs) mean `"patch"` / None.
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
        depths=None,
        num_heads=(4, 8, 16, 32),
        window_size=6,
        hidden_sizes=None,
        embedding_size=64,
        layer_type="bottleneck",
        convnext_version=1,
        layer_decay_type="single",
        conv_masking="token",
        decoder_type="simmim",
        decoder_hidden_size=768,
        mlp_ratio=4.0,
        qkv_bias=True,
        hidden_act=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        layer_norm_eps=None,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=None,
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
            use_mean_pooling,
        )
        depths = defaults["depths"] if depths is None else depths
        self._set_swin_fields(embed_dim, depths, num_heads, window_size, patch_norm, pretrained_window_sizes)
        self._set_cnn_fields(
            hidden_sizes, embedding_size, layer_type, convnext_version, layer_decay_type, conv_masking, decoder_type,
            decoder_hidden_size,
        )
        self.layer_scale_init_value = (
            self._default_layer_scale() if layer_scale_init_value is None else layer_scale_init_value
        )
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_act = defaults["hidden_act"] if hidden_act is None else hidden_act
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
        use_mean_pooling,
    ):
        """The fields only the ViT encoder reads (`BACKBONE_FIELDS["vit"]`, with `layer_scale_init_value`, which
        ConvNeXt shares)."""
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.use_relative_position_bias = use_relative_position_bias
        self.use_shared_relative_position_bias = use_shared_relative_position_bias
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
        """The fields only the Swin encoders read (`BACKBONE_FIELDS["swin"]`, `BACKBONE_FIELDS["swinv2"]`; `depths`
        is the CNNs' too)."""
        self.embed_dim = embed_dim
        self.depths = list(depths) if isinstance(depths, (list, tuple)) else depths
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.patch_norm = patch_norm
        self.pretrained_window_sizes = (
            [0] * len(self.depths) if pretrained_window_sizes is None else list(pretrained_window_sizes)
        )

    def _set_cnn_fields(
        self, hidden_sizes, embedding_size, layer_type, convnext_version, layer_decay_type, conv_masking, decoder_type,
        decoder_hidden_size,
    ):
        """The fields only the ResNet and ConvNeXt encoders (and their decoders) read (`BACKBONE_FIELDS`)."""
        if hidden_sizes is None:
            hidden_sizes = BACKBONE_DEFAULTS[self.backbone].get("hidden_sizes")
        self.hidden_sizes = list(hidden_sizes) if isinstance(hidden_sizes, (list, tuple)) else hidden_sizes
        self.embedding_size = embedding_size
        self.layer_type = layer_type
        self.convnext_version = convnext_version
        self.layer_decay_type = layer_decay_type
        self.conv_masking = conv_masking
        self.decoder_type = decoder_type
        self.decoder_hidden_size = decoder_hidden_size

    def _default_layer_scale(self):
        key = (self.backbone, self.convnext_version) if self.backbone == "convnext" else self.backbone
        return LAYER_SCALE_DEFAULTS.get(key, 0.0)

    # ------------------------------------------------------------------ derived values
    @property
    def grid_size(self):
        """Side of the patch-token grid after the patch embedding (the CNNs: of the stem's output)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size**2

    @property
    def feature_grid_size(self):
        """Side of the encoder's final feature map (what the decoder sees)."""
        return self.image_size // self.encoder_stride

    def _set_derived_fields(self, hidden_size, layer_norm_eps, encoder_stride):
        """The width after the last stage (Swin, CNNs), the backbone's LayerNorm eps (as the official code), the
        stride."""
        if self.backbone in SWIN_BACKBONES:
            hidden_size = self.embed_dim * 2 ** (len(self.depths) - 1)
        elif self.backbone in CNN_BACKBONES:
            hidden_size = self.hidden_sizes[-1]
        self.hidden_size = hidden_size
        if layer_norm_eps is None:
            layer_norm_eps = BACKBONE_DEFAULTS[self.backbone]["layer_norm_eps"]
        self.layer_norm_eps = layer_norm_eps
        derived_stride = self._derived_encoder_stride()
        if encoder_stride is not None and encoder_stride != derived_stride:
            raise ValueError(
                f"encoder_stride={encoder_stride} does not match the encoder's total downsampling {derived_stride} "
                f"(backbone={self.backbone!r}, patch_size={self.patch_size}"
                + (f", {len(self.depths)} stages" if self.backbone != "vit" else "")
                + "): the decoder would reconstruct an image of the wrong size. Leave encoder_stride unset; it is "
                "derived from the backbone."
            )
        self.encoder_stride = derived_stride

    def _derived_encoder_stride(self):
        if self.backbone == "vit":
            return self.patch_size
        return self.patch_size * 2 ** (len(self.depths) - 1)

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
        elif self.backbone in SWIN_BACKBONES:
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
        if self.backbone in CNN_BACKBONES:
            self._validate_cnn_fields()
        elif (self.conv_masking, self.decoder_type) != ("token", "simmim"):
            raise ValueError(
                f"conv_masking={self.conv_masking!r} and decoder_type={self.decoder_type!r} are for the convolutional "
                f"backbones {CNN_BACKBONES}: a {self.backbone} model masks tokens and uses SimMIM's decoder; drop them."
            )

    def _validate_cnn_fields(self):
        check_conv_encoder_config(self)
        if self.backbone == "resnet":
            check_resnet_config(self)
            if self.patch_size != RESNET_STEM_STRIDE:
                raise ValueError(
                    f"patch_size={self.patch_size} with backbone='resnet': the ResNet stem (7x7 stride-2 convolution "
                    f"+ stride-2 max pooling) always downsamples by {RESNET_STEM_STRIDE}; set patch_size="
                    f"{RESNET_STEM_STRIDE} (the mask is given per {RESNET_STEM_STRIDE}x{RESNET_STEM_STRIDE} patch)."
                )
        else:
            check_convnext_config(self)
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type={self.decoder_type!r} is not supported: use one of {DECODER_TYPES}.")
        if self.conv_masking == "sparse" and self.decoder_type != "hierarchical":
            raise ValueError(
                "conv_masking='sparse' with decoder_type='simmim': a sparse encoder holds 0 at every masked position, "
                "so SimMIM's one-layer decoder (1x1 convolution + PixelShuffle) has nothing to reconstruct a masked "
                "square from. Set decoder_type='hierarchical' (SparK's decoder fills masked positions with mask "
                "tokens), or conv_masking='token'."
            )

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
        elif self.backbone in SWIN_BACKBONES:
            self._validate_stage_geometry()
        elif self.decoder_type == "hierarchical":
            hierarchical_decoder_blocks(self)

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
        them. The overridden config is validated as a new one is, and its derived fields (width, stride) follow the
        overrides."""
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
        config._set_derived_fields(config.hidden_size, config.layer_norm_eps, kwargs.get("encoder_stride"))
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
# The CNNs pretrain as SparK (keyu-tian/SparK pretrain/: masked dense convolution, its light hierarchical decoder, L2
# on the masked 32 px squares standardised one by one, mask ratio 0.6; drop path as SparK's model defaults: ResNet-50
# 0.05, none for ConvNeXt-T, which SparK does not list) and ConvNeXt V2's FCMAE
# (facebookresearch/ConvNeXt-V2 models/fcmae.py: the same target, loss and masking; its decoder, one ConvNeXt block
# at stride 32, is replaced by SparK's, which a sparse encoder needs here).
CNN_PRETRAINING = dict(
    conv_masking="sparse", decoder_type="hierarchical", decoder_hidden_size=768, loss_type="l2",
    norm_target="mask_patch", mask_patch_size=32, mask_ratio=0.6, drop_path_rate=0.0,
)
_CONVNEXT_TINY = dict(CNN_PRETRAINING, backbone="convnext", hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
# Tiny CNNs for 32 px images: three stages (stride 16), 8 px masked squares, the pixels as target (readable pictures).
_CNN_TEST = dict(
    CNN_PRETRAINING, image_size=32, patch_size=4, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], mask_patch_size=8,
    decoder_hidden_size=64, norm_target=None,
)

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
    # The convolutional encoders (transformers' microsoft/resnet-50, facebook/convnext-tiny-224 and
    # facebook/convnextv2-tiny-1k-224 architectures), pretrained as SparK / FCMAE (see CNN_PRETRAINING).
    "resnet50-224": dict(
        CNN_PRETRAINING, backbone="resnet", image_size=224, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3], layer_type="bottleneck", drop_path_rate=0.05,
    ),
    # ConvNeXt V1 fine-tunes with the official 12-group layer ids, V2 with one id per block (each repo's default).
    "convnext-tiny-224": dict(
        _CONVNEXT_TINY, image_size=224, convnext_version=1, layer_scale_init_value=1e-6, layer_decay_type="group"
    ),
    "convnextv2-tiny-224": dict(_CONVNEXT_TINY, image_size=224, convnext_version=2, layer_decay_type="single"),
    "resnet-tiny-test": dict(_CNN_TEST, backbone="resnet", embedding_size=16, layer_type="basic"),
    "convnext-tiny-test": dict(_CNN_TEST, backbone="convnext", convnext_version=1, layer_scale_init_value=1e-6),
    "convnextv2-tiny-test": dict(_CNN_TEST, backbone="convnext", convnext_version=2),
}
