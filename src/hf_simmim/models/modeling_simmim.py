"""SimMIM models: the encoder (`SimMIMModel`), pretraining (`SimMIMForMaskedImageModeling`) and fine-tuning
(`SimMIMForImageClassification`).

The walk from pixels to loss, in `SimMIMForMaskedImageModeling.forward`:
pixel_values + bool_masked_pos -> encoder (masked patch embeddings replaced by the mask token; all tokens go
through every block) -> feature map (B, C, H/stride, W/stride) -> decoder (1x1 conv + PixelShuffle) ->
reconstruction (B, 3, H, W) -> `simmim_loss` on the masked pixels only.

The convolutional encoders (ResNet, ConvNeXt) hide the masked content by `config.conv_masking` (see
`modeling_conv_masking`), and may decode with SparK's hierarchical decoder over every stage's output
(`decoder_type="hierarchical"`) instead.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .configuration_simmim import CNN_BACKBONES, SimMIMConfig, check_norm_target
from .modeling_conv_masking import HierarchicalDecoder
from .modeling_convnext import ConvNextEncoder
from .modeling_resnet import ResNetEncoder
from .modeling_resize import (
    SHARED_TABLE,
    checkpoint_shapes,
    fill_position_tables,
    plan_position_tables,
    read_checkpoint_tensor,
)
from .modeling_swin import (
    SwinBlock,
    SwinTransformer,
    WindowAttention,
    swin_relative_position_index,
    swin_shift_attention_mask,
)
from .modeling_swinv2 import CosineWindowAttention, SwinV2Block, SwinV2Transformer, swinv2_relative_coords_table
from .modeling_vit import RelativePositionBias, ViTBlock, VisionTransformer, vit_relative_position_index

logger = logging.get_logger(__name__)

# Each backbone's encoder, and its block (the unit FSDP wraps and gradient checkpointing recomputes).
# For the CNNs, the stage: the unit gradient checkpointing recomputes, as in transformers' ResNet / ConvNext.
ENCODER_CLASSES = {
    "vit": VisionTransformer,
    "swin": SwinTransformer,
    "swinv2": SwinV2Transformer,
    "resnet": ResNetEncoder,
    "convnext": ConvNextEncoder,
}
BLOCK_CLASS_NAMES = {
    "vit": "ViTBlock", "swin": "SwinBlock", "swinv2": "SwinV2Block", "resnet": "ResNetStage", "convnext": "ConvNextStage"
}

AUTO_MAP = {
    "AutoConfig": "configuration_simmim.SimMIMConfig",
    "AutoModel": "modeling_simmim.SimMIMModel",
    "AutoModelForMaskedImageModeling": "modeling_simmim.SimMIMForMaskedImageModeling",
    "AutoModelForImageClassification": "modeling_simmim.SimMIMForImageClassification",
}


# ---------------------------------------------------------------------------------------------- input checks
def check_pixel_values(pixel_values, config):
    if pixel_values is None:
        raise ValueError("pixel_values is required: a float tensor of shape (batch, channels, height, width).")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a float tensor of normalised images, got {pixel_values.dtype}: preprocess the "
            "images with the checkpoint's image processor (or `hf_simmim.data`)."
        )
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, {config.num_channels}, {config.image_size}, {config.image_size}); "
            f"got shape {tuple(pixel_values.shape)}."
        )
    _, c, h, w = pixel_values.shape
    if c != config.num_channels:
        raise ValueError(
            f"pixel_values has {c} channels but the model expects num_channels={config.num_channels}: convert images "
            "to RGB (the image processor and `hf_simmim.data` do this)."
        )
    if (h, w) != (config.image_size, config.image_size):
        raise ValueError(
            f"pixel_values is {h}x{w} but the model was built for image_size={config.image_size}: resize or crop "
            "the images to that size (the checkpoint's image processor does this)."
        )


def mask_to_grid(bool_masked_pos, config, batch_size):
    """Accept `(B, num_patches)` or `(B, h, w)`, bool or 0/1 integers; return a `(B, g, g)` bool grid."""
    g = config.grid_size
    expected = f"(batch, {g * g}) or (batch, {g}, {g})"
    if bool_masked_pos.is_floating_point() or bool_masked_pos.is_complex():
        raise ValueError(f"bool_masked_pos must be bool or 0/1 integers of shape {expected}; got {bool_masked_pos.dtype}.")
    shape = tuple(bool_masked_pos.shape)
    if shape not in ((batch_size, g * g), (batch_size, g, g)):
        raise ValueError(
            f"bool_masked_pos has shape {shape}, expected {expected}: one entry per {config.patch_size}x"
            f"{config.patch_size} patch (image_size={config.image_size}, patch_size={config.patch_size}). "
            "Masks from `hf_simmim.SimMIMMaskGenerator(config)` have the right shape."
        )
    if bool_masked_pos.dtype != torch.bool:
        if ((bool_masked_pos != 0) & (bool_masked_pos != 1)).any():
            raise ValueError("bool_masked_pos must hold only 0 and 1 (1 = masked).")
        bool_masked_pos = bool_masked_pos.bool()
    return bool_masked_pos.reshape(batch_size, g, g)


def mismatched_weights_error(checkpoint, refused):
    """The `RuntimeError` for checkpoint weights of another shape than the config gives (`refused`: model key,
    checkpoint shape, model shape), naming the first few and the fix."""
    listed = ", ".join(
        f"{key} (checkpoint {tuple(saved)}, model {tuple(built)})" for key, saved, built in sorted(refused)[:4]
    )
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    return RuntimeError(
        f"{checkpoint}: weights of another shape than this config gives: {listed}{more}. Fix the config overrides "
        "(the checkpoint's config.json gives the shapes it was saved with), or pass ignore_mismatched_sizes=True "
        "(run_finetune.py: --ignore_mismatched_sizes) to re-initialise them."
    )


# ---------------------------------------------------------------------------------------------- loss
def normalize_per_patch(images, patch_size, eps=1e-6):
    """Zero mean, unit variance per channel inside each non-overlapping `patch_size` patch."""
    b, c, h, w = images.shape
    patches = images.view(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    mean = patches.mean(dim=(3, 5), keepdim=True)
    var = patches.var(dim=(3, 5), keepdim=True, unbiased=False)
    return ((patches - mean) / (var + eps).sqrt()).view(b, c, h, w)


def normalize_per_square(images, size, eps=1e-6):
    """SparK's and ConvNeXt V2 FCMAE's normalised target (`norm_pix_loss`): each non-overlapping `size` square
    standardised over its pixels and channels together, with the unbiased variance: `(x - mean) / sqrt(var + eps)`."""
    b, c, h, w = images.shape
    squares = images.view(b, c, h // size, size, w // size, size)
    mean = squares.mean(dim=(1, 3, 5), keepdim=True)
    var = squares.var(dim=(1, 3, 5), keepdim=True, correction=1)
    return ((squares - mean) / (var + eps).sqrt()).view(b, c, h, w)


def normalize_locally(images, patch_size, eps=1e-6):
    """The official SwinV2 SimMIM normalised target (`norm_targets` of microsoft/Swin-Transformer `models/simmim.py`):
    each pixel of each channel standardised over the `patch_size` x `patch_size` neighbourhood centred on it, the
    part inside the image only, with the unbiased variance (clamped at 0). `patch_size` is odd (official: 47)."""
    pad = patch_size // 2
    mean = F.avg_pool2d(images, patch_size, stride=1, padding=pad, count_include_pad=False)
    mean_of_squares = F.avg_pool2d(images**2.0, patch_size, stride=1, padding=pad, count_include_pad=False)
    # the number of in-image pixels of each neighbourhood, the same for every image and channel
    ones = images.new_ones((1, 1, *images.shape[-2:]))
    count = F.avg_pool2d(ones, patch_size, stride=1, padding=pad, count_include_pad=True) * patch_size**2
    variance = torch.clamp((mean_of_squares - mean**2.0) * (count / (count - 1)), min=0.0)
    return (images - mean) / (variance + eps) ** 0.5


def simmim_loss(
    pixel_values, reconstruction, mask_grid, patch_size, loss_type="l1", norm_target=None, norm_target_patch_size=47,
    mask_patch_size=None,
):
    """The SimMIM loss: the pixel loss averaged over masked pixels and channels only.

    `mask_grid` `(B, g, g)` is upsampled to pixels by repetition; the official formula is
    `sum(|x - x_rec| * M) / (sum(M) + 1e-5) / C`, where x is the pixels or, with `norm_target` (see `SimMIMConfig`),
    their `"local"` (`normalize_locally`, official SwinV2), `"patch"` (`normalize_per_patch`) or `"mask_patch"`
    (`normalize_per_square` by `mask_patch_size`, SparK / FCMAE) standardisation. With whole masked squares, the mean
    over masked pixels is SparK's and FCMAE's mean over masked squares of the per-square mean.
    Computed in (at least) float32 whatever the model's dtype, as the official code under autocast: a bf16 sum over
    millions of pixels keeps only about 3 significant digits.
    """
    dtype = torch.promote_types(reconstruction.dtype, torch.float32)
    target = pixel_values.to(dtype)
    norm_target = check_norm_target(norm_target)
    if norm_target == "local":
        target = normalize_locally(target, norm_target_patch_size)
    elif norm_target == "patch":
        target = normalize_per_patch(target, patch_size)
    elif norm_target == "mask_patch":
        if mask_patch_size is None:
            raise ValueError("norm_target='mask_patch' standardises each mask_patch_size square: pass mask_patch_size.")
        target = normalize_per_square(target, mask_patch_size)
    reconstruction = reconstruction.to(dtype)
    mask = mask_grid.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).to(dtype)
    if loss_type == "l1":
        per_pixel = F.l1_loss(target, reconstruction, reduction="none")
    elif loss_type == "l2":
        per_pixel = F.mse_loss(target, reconstruction, reduction="none")
    else:
        per_pixel = F.smooth_l1_loss(target, reconstruction, reduction="none")
    return (per_pixel * mask).sum() / (mask.sum() + 1e-5) / pixel_values.shape[1]


# ---------------------------------------------------------------------------------------------- models
def init_as_pytorch_default(layer):
    """`nn.Conv2d.reset_parameters` (and `nn.Linear`'s, the same rule), written out: transformers may skip a module's
    own init when it builds a model. Weight and bias are U(+-1/sqrt(fan_in)) (kaiming-uniform with a=sqrt(5) gives
    that bound for the weight)."""
    init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.weight[0].numel())  # fan_in = in_channels / groups * kernel area
        init.uniform_(layer.bias, -bound, bound)


class SimMIMPreTrainedModel(PreTrainedModel):
    config_class = SimMIMConfig
    base_model_prefix = "simmim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Attention runs SDPA (the default) or the eager kernel (`attn_implementation="eager"`, and for any call that
    # asks for the weights). Flash and flex kernels take no additive float bias, which the relative position bias
    # and Swin's shift mask are. No serving backend either (vLLM's Transformers backend): those hand their own
    # arguments to the attention functions through `forward(**kwargs)`, which these models refuse.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    # The loss is a per-batch mean: Trainer must average it over accumulation steps, not rescale it by a count.
    accepts_loss_kwargs = False
    # The official pretraining ViT (`VisionTransformerForSimMIM`) truncates its normal init at +-1 std; the official
    # fine-tuning ViT and Swin do not. `SimMIMModel` sets this for the encoder it holds.
    truncates_init_at_one_std = False

    def __init__(self, config, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # FSDP wraps these blocks; only the backbone's own block class exists in the model.
        self._no_split_modules = [BLOCK_CLASS_NAMES[config.backbone]]

    def _init_normal_(self, tensor, scale=1.0):
        """N(0, (initializer_range * scale)^2), as the official models draw it: truncated at +-1 std where
        `truncates_init_at_one_std`, else within timm's default absolute bounds +-2 (no effective truncation). `scale`
        is the official rescaling after the draw (`fix_init_weight`, the ViT head's `init_scale`): it scales the
        bounds too."""
        std = self.config.initializer_range * scale
        bound = std if self.truncates_init_at_one_std else 2.0 * scale
        init.trunc_normal_(tensor, std=std, a=-bound, b=bound)

    @torch.no_grad()
    def _init_weights(self, module):
        """The official initialisation, module by module. transformers calls this for every module, children before
        their parent (so a parent may override its children's init), and again, on loading, for what a checkpoint
        did not fill; the `init` helpers leave loaded tensors alone. Non-persistent buffers are recomputed here too:
        loading on the meta device leaves them empty. The CNN encoders' and the hierarchical decoder's modules carry
        their own rule (`init_rule`: ResNet as transformers, ConvNeXt as the official code, the decoder as SparK)."""
        rule = getattr(module, "init_rule", None)
        if rule is not None:
            rule(module, self.config)
        elif isinstance(module, nn.Linear) and getattr(module, "init_as_pytorch_default", False):
            init_as_pytorch_default(module)  # transformers' (and torchvision's) ResNet head
        elif isinstance(module, nn.Linear):
            self._init_normal_(module.weight, getattr(module, "init_scale", 1.0))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init_as_pytorch_default(module)  # what the official decoder and Swin patch embedding keep
        elif isinstance(module, nn.LayerNorm):
            init.constant_(module.weight, getattr(module, "init_weight", 1.0))  # SwinV2's post-norms: 0
            init.zeros_(module.bias)
        elif isinstance(module, VisionTransformer):
            # The official ViT draws its patch-embedding conv like its Linear layers (Swin's keeps PyTorch's init).
            self._init_normal_(module.patch_embed.proj.weight)
            init.zeros_(module.patch_embed.proj.bias)
            for param in (module.cls_token, module.mask_token, module.pos_embed):
                if param is not None:
                    self._init_normal_(param)
        elif isinstance(module, SwinTransformer):
            for param in (module.mask_token, module.absolute_pos_embed):
                if param is not None:
                    self._init_normal_(param)
        elif isinstance(module, RelativePositionBias):
            init.zeros_(module.relative_position_bias_table)  # the official ViT never initialises its tables
            init.copy_(module.relative_position_index, vit_relative_position_index(module.grid_size))
        elif isinstance(module, WindowAttention):
            self._init_normal_(module.relative_position_bias_table)
            init.copy_(module.relative_position_index, swin_relative_position_index(module.window))
        elif isinstance(module, ViTBlock) and module.gamma_1 is not None:
            init.constant_(module.gamma_1, self.config.layer_scale_init_value)
            init.constant_(module.gamma_2, self.config.layer_scale_init_value)
        elif isinstance(module, (SwinBlock, SwinV2Block)) and module.attn_mask is not None:
            init.copy_(module.attn_mask, swin_shift_attention_mask(module.resolution, module.window, module.shift))
        elif isinstance(module, CosineWindowAttention):
            init.constant_(module.logit_scale, math.log(10.0))
            for bias in (module.q_bias, module.v_bias):
                if bias is not None:
                    init.zeros_(bias)
            table = swinv2_relative_coords_table(module.window, module.pretrained_window)
            init.copy_(module.relative_coords_table, table)
            init.copy_(module.relative_position_index, swin_relative_position_index(module.window))

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """transformers' loading, plus position tables at another size (e.g. a checkpoint pretrained with window 6
        loaded with `window_size=7`) interpolated instead of refused, and a ViT built with per-block relative
        position bias starting every block from a checkpoint's shared table, as the official fine-tuning does.

        Planned from the checkpoint's file headers before any weight is read, so weights of another shape that
        nothing fits raise `RuntimeError` here, as transformers does after loading (`ignore_mismatched_sizes=True`
        re-initialises them, as transformers)."""
        shapes = checkpoint_shapes(state_dict, checkpoint_files)
        plan = plan_position_tables(model, shapes)
        if plan.refused and not load_config.ignore_mismatched_sizes:
            raise mismatched_weights_error(load_config.pretrained_model_name_or_path, plan.refused)
        loading = PreTrainedModel._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, *args, **kwargs
        )
        sources = set(plan.resized.values()) | set(plan.copied.values())
        if sources:  # written by `_adjust_missing_and_unexpected_keys`, once transformers has placed the parameters
            model._position_table_fill = (
                plan,
                {key: read_checkpoint_tensor(state_dict, key, shapes[key][1]) for key in sources},
            )
        return loading

    def _adjust_missing_and_unexpected_keys(self, loading_info):
        """transformers' adjustment, plus the tables `_load_pretrained_model` planned: written now, and kept out of
        the load report and loading info (they are neither missing, nor unexpected, nor re-initialised)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        plan, checkpoint_tensors = self.__dict__.pop("_position_table_fill", (None, None))
        if plan is None:
            return
        fill_position_tables(self, plan, checkpoint_tensors)
        filled = set(plan.resized) | set(plan.copied)
        loading_info.mismatched_keys = {entry for entry in loading_info.mismatched_keys if entry[0] not in filled}
        loading_info.missing_keys -= filled
        if plan.copied:
            loading_info.unexpected_keys = {key for key in loading_info.unexpected_keys if not SHARED_TABLE.search(key)}
        done = [f"interpolated to this config's size: {', '.join(sorted(plan.resized))}"] if plan.resized else []
        if plan.copied:
            done.append(f"started {len(plan.copied)} per-block relative position tables from the shared one")
        logger.info(f"{type(self).__name__} position tables {'; '.join(done)}.")

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Record every Auto class, so `trust_remote_code=True` loads this checkpoint as any of them.
        if getattr(type(self), "_auto_class", None) is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _check_extra_arguments(self, kwargs, ignored=()):
        """Refuse misspelt or unsupported forward arguments instead of silently ignoring them."""
        unknown = sorted(name for name in kwargs if name not in ignored)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.forward got unexpected arguments {unknown}: it takes pixel_values"
                + (", bool_masked_pos" if not isinstance(self, SimMIMForImageClassification) else ", labels")
                + ", output_attentions, output_hidden_states and return_dict."
            )

    def _check_inputs(self, pixel_values, bool_masked_pos):
        check_pixel_values(pixel_values, self.config)
        if bool_masked_pos is not None:
            return mask_to_grid(bool_masked_pos, self.config, pixel_values.shape[0])
        return None


class SimMIMPooler(nn.Module):
    """Average of the patch tokens (the CNNs: of the final map's positions); for ViT with `use_mean_pooling`, and for
    ConvNeXt (transformers' final `layernorm`, the official head's norm), followed by `fc_norm`."""

    def __init__(self, config):
        super().__init__()
        use_fc_norm = (config.backbone == "vit" and config.use_mean_pooling) or config.backbone == "convnext"
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_fc_norm else None

    def forward(self, patch_tokens):
        pooled = patch_tokens.mean(dim=1)
        return pooled if self.fc_norm is None else self.fc_norm(pooled)


class SimMIMModel(SimMIMPreTrainedModel):
    """The SimMIM encoder (ViT, Swin, SwinV2, ResNet or ConvNeXt) as a vision backbone.

    `forward(pixel_values, bool_masked_pos=None)` returns `last_hidden_state` (ViT: `(B, 1 + L, C)` with CLS
    first; Swin: `(B, L_last, C)`; ResNet and ConvNeXt: the final map `(B, C, H / stride, W / stride)`, as
    transformers' ResNetModel / ConvNextModel), `pooler_output` `(B, C)`, with `output_hidden_states=True` the input
    of every ViT block / Swin stage and the final output (the CNNs: the stem's output and every stage's, as
    transformers'), and with `output_attentions=True` every block's attention weights (ViT: `(B, heads, 1 + L,
    1 + L)`; Swin and SwinV2: per window, `(B * windows, heads, N, N)`, as transformers' Swin; the CNNs have none).
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config, add_pooling_layer=True, use_mask_token=True):
        super().__init__(config)
        self.encoder = ENCODER_CLASSES[config.backbone](config, use_mask_token=use_mask_token)
        # The encoder with a mask token stands for the official pretraining encoder, the one without for the
        # fine-tuning one; only the pretraining ViT truncates its init at +-1 std.
        self.truncates_init_at_one_std = config.backbone == "vit" and use_mask_token
        self.pooler = SimMIMPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        """The patch embedding (ViT, Swin) or the stem (ResNet, ConvNeXt)."""
        return self.encoder.stem if self.config.backbone in CNN_BACKBONES else self.encoder.patch_embed

    def _input_dtype(self):
        embedding = self.get_input_embeddings()
        return (embedding.convolution if self.config.backbone in CNN_BACKBONES else embedding.proj).weight.dtype

    @can_return_tuple
    def forward(
        self,
        pixel_values=None,
        bool_masked_pos=None,
        output_attentions=None,
        output_hidden_states=None,
        **kwargs,
    ):
        self._check_extra_arguments(kwargs)
        mask_grid = self._check_inputs(pixel_values, bool_masked_pos)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if self.config.backbone in CNN_BACKBONES and output_attentions:
            raise ValueError(
                f"output_attentions=True: a {self.config.backbone} encoder is convolutional and has no attention "
                "weights; leave output_attentions unset."
            )
        if output_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"output_attentions=True with attn_implementation={self.config._attn_implementation!r}, which returns "
                "no attention weights: these calls run the eager attention instead. Load the model with "
                'attn_implementation="eager" to run it always.'
            )
        # Float32 images (what the image processor gives) also feed a model loaded in bf16/fp16, as in transformers.
        pixel_values = pixel_values.to(self._input_dtype())
        encoded = self.encoder(
            pixel_values, mask_grid, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        sequence = encoded.last_hidden_state
        pooled = self.pooler(self.encoder.patch_tokens(sequence)) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )


class SimMIMForMaskedImageModeling(SimMIMPreTrainedModel):
    """SimMIM pretraining: encoder + one 1x1 conv + PixelShuffle decoder (or, for the CNNs with
    `decoder_type="hierarchical"`, SparK's decoder over every stage's output) + masked pixel loss.

    `forward(pixel_values, bool_masked_pos)` returns `MaskedImageModelingOutput(loss, reconstruction, ...)`;
    `bool_masked_pos` is `(B, num_patches)` or `(B, h, w)`, bool or 0/1 integers (1 = masked). Without a mask, the
    model reconstructs the unmasked image and returns no loss.
    """

    def __init__(self, config):
        super().__init__(config)
        self.simmim = SimMIMModel(config, add_pooling_layer=False, use_mask_token=True)
        if self.hierarchical:
            self.decoder = HierarchicalDecoder(config)
        else:
            stride = config.encoder_stride
            self.decoder = nn.Sequential(
                nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1),
                nn.PixelShuffle(stride),
            )
        self.post_init()

    @property
    def hierarchical(self):
        return self.config.backbone in CNN_BACKBONES and self.config.decoder_type == "hierarchical"

    @can_return_tuple
    def forward(
        self,
        pixel_values=None,
        bool_masked_pos=None,
        output_attentions=None,
        output_hidden_states=None,
        **kwargs,
    ):
        # `labels` may come along in batches built from labelled datasets; pretraining has no use for them.
        self._check_extra_arguments(kwargs, ignored=("labels",))
        mask_grid = self._check_inputs(pixel_values, bool_masked_pos)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        outputs = self.simmim(
            pixel_values,
            bool_masked_pos=mask_grid,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states or self.hierarchical,  # the decoder reads every stage
            return_dict=True,
        )
        if self.hierarchical:
            reconstruction = self.decoder(outputs.hidden_states[1:], mask_grid)
        else:
            reconstruction = self.decoder(self.simmim.encoder.feature_map(outputs.last_hidden_state))
        loss = None
        if mask_grid is not None:
            loss = simmim_loss(
                pixel_values,
                reconstruction,
                mask_grid,
                self.config.patch_size,
                self.config.loss_type,
                self.config.norm_target,
                self.config.norm_target_patch_size,
                self.config.mask_patch_size,
            )
        return MaskedImageModelingOutput(
            loss=loss,
            reconstruction=reconstruction,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


class SimMIMForImageClassification(SimMIMPreTrainedModel):
    """The encoder with the official fine-tuning head: ViT averages the patch tokens and applies `fc_norm`; Swin
    averages the normalised final tokens; ResNet averages the final map (transformers' ResNet); ConvNeXt averages it
    and applies `fc_norm` (the official head's LayerNorm, transformers' final `layernorm`). `labels` give the loss
    `config.problem_type` names (see `classification_loss`).

    Loading a pretraining checkpoint drops the decoder and the mask token (and, for ViT, the final norm that mean
    pooling replaces); ConvNeXt's `fc_norm` starts fresh, as after FCMAE.
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"mask_token", r"^simmim\.encoder\.norm\."]

    def __init__(self, config):
        if config.backbone == "vit" and not config.use_mean_pooling:
            config = copy.deepcopy(config)  # leave the caller's config (e.g. shared with a pretraining model) as it is
            config.use_mean_pooling = True
        super().__init__(config)
        self.num_labels = config.num_labels
        self.simmim = SimMIMModel(config, add_pooling_layer=True, use_mask_token=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        if config.num_labels > 0:
            self._set_classifier_init(config)
        self.post_init()

    def _set_classifier_init(self, config):
        """The official heads' init: the ViT head's `init_scale` 1e-3, ConvNeXt V2 fine-tuning's `head_init_scale`
        1e-3 (main_finetune.py), PyTorch's default for ResNet (transformers', torchvision's); Swin's and ConvNeXt
        V1's are drawn as any Linear."""
        if config.backbone == "vit" or (config.backbone == "convnext" and config.convnext_version == 2):
            self.classifier.init_scale = 1e-3
        elif config.backbone == "resnet":
            self.classifier.init_as_pytorch_default = True

    @can_return_tuple
    def forward(self, pixel_values=None, labels=None, output_attentions=None, output_hidden_states=None, **kwargs):
        self._check_extra_arguments(kwargs)
        outputs = self.simmim(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = self.classification_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def classification_loss(self, logits, labels):
        """The loss of transformers' image classifiers for `config.problem_type`: `"regression"` MSE,
        `"single_label_classification"` cross-entropy, `"multi_label_classification"` BCE with logits; when None,
        inferred and recorded in the config as they do (one label: regression; integer labels: single-label; float
        labels: multi-label).

        Beyond them, soft targets (mixup / cutmix): under `"single_label_classification"`, float labels of shape
        (batch, num_labels) give the cross-entropy against those class probabilities. Float labels alone infer
        multi-label, so training with soft targets sets `problem_type="single_label_classification"`.
        """
        soft_targets = self.num_labels > 1 and labels.is_floating_point() and labels.shape == logits.shape
        if soft_targets and self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits, labels.to(logits.device, logits.dtype))
        if soft_targets and self.config.problem_type is None:
            logger.warning_once(
                "Float labels of shape (batch, num_labels) with config.problem_type=None: inferring "
                "multi_label_classification (binary cross-entropy per class), as transformers does. For soft targets "
                '(mixup / cutmix) set config.problem_type="single_label_classification".'
            )
        if self.config.problem_type == "multi_label_classification" and labels.shape != logits.shape:
            # transformers fails here inside BCE with a bare shape error; e.g. class indices at evaluation after
            # soft targets in training made the inferred type multi-label.
            raise ValueError(
                f"config.problem_type='multi_label_classification' takes float labels of shape {tuple(logits.shape)} "
                f"(batch, num_labels); got {tuple(labels.shape)}. For class indices or soft targets, set "
                "config.problem_type='single_label_classification'."
            )
        return self.loss_function(labels, logits, self.config)


__all__ = [
    "SimMIMPreTrainedModel",
    "SimMIMModel",
    "SimMIMForMaskedImageModeling",
    "SimMIMForImageClassification",
    "simmim_loss",
]
