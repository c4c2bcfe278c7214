"""Masked image modeling for convolutional encoders (ResNet, ConvNeXt): the mask at every resolution, batch
normalisation over visible positions, the encoder forward both CNN encoders share, and a SparK-style hierarchical
decoder.

The mask arrives as SimMIM's `(B, g, g)` patch grid (True = masked). `config.conv_masking` chooses how the encoder
hides the masked content:

- `"token"` (SimMIM as for transformers): masked input pixels are set to 0 (the normalised mean colour) before the
  stem, and the stem output at masked positions is replaced by the mask token (`config.mask_token_type`). Everything
  after the stem is dense: convolutions spread visible context into masked positions and back.
- `"sparse"` (masked dense convolution, as SparK and ConvNeXt V2's FCMAE): masked pixels are set to 0, and every
  feature map is held at 0 at masked positions, so each convolution reads visible positions only (a submanifold
  sparse convolution written densely). BatchNorm statistics cover visible positions only (SparK's
  `SparseBatchNorm2d`), LayerNorm is per position with masked outputs zeroed (SparK's `SparseConvNeXtLayerNorm`),
  and GRN's norms cover visible positions only, per sample (FCMAE's sparse GRN pools them over the whole batch,
  unlike its dense GRN: ConvNeXt-V2 issue 86). The encoder has no mask token: mask tokens enter in the decoder
  (`HierarchicalDecoder`), as in SparK and FCMAE.

In both modes the encoder output does not depend on the pixel values under the mask. A mask grid coarser than a
feature map is repeated onto it; onto a coarser map, a cell is visible if any cell it covers is visible (the output
coordinates of a strided sparse convolution).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

from .configuration_simmim import check_conv_encoder_config, hierarchical_decoder_blocks
from .modeling_layers import fill_masked_tokens


def _check_divides(small, large, what):
    if large % small:
        raise ValueError(
            f"bool_masked_pos grid side {what[0]} and feature map side {what[1]} are not multiples of one another: "
            "the mask grid must be image_size / patch_size (one entry per patch_size x patch_size patch)."
        )


def visible_at(mask_grid, size):
    """`(B, g_h, g_w)` bool mask (True = masked) -> `(B, 1, h, w)` float map, 1 where visible, at `size = (h, w)`."""
    visible = (~mask_grid.bool()).unsqueeze(1).float()
    (g_h, g_w), (h, w) = mask_grid.shape[1:], size
    if h >= g_h:
        _check_divides(g_h, h, (g_h, h))
        _check_divides(g_w, w, (g_w, w))
        return visible.repeat_interleave(h // g_h, dim=2).repeat_interleave(w // g_w, dim=3)
    _check_divides(h, g_h, (g_h, h))
    _check_divides(w, g_w, (g_w, w))
    return F.max_pool2d(visible, kernel_size=(g_h // h, g_w // w))


def visible_pyramid(mask_grid, image_size, strides, dtype):
    """`{(h, w): visible map}` at each `stride` of an image of `image_size = (H, W)`; layers look theirs up by the
    spatial size of their output."""
    height, width = image_size
    sizes = {(height // stride, width // stride) for stride in strides}
    return {size: visible_at(mask_grid, size).to(dtype) for size in sorted(sizes)}


def visible_for(visible, features):
    """The visible map at the resolution of `features` `(B, C, h, w)`, or None without a mask."""
    return None if visible is None else visible[tuple(features.shape[-2:])]


def fill_masked_positions(features, visible, mask_token, mask_token_type):
    """`fill_masked_tokens` on a `(B, C, h, w)` map: masked positions take the mask token (or zeros / noise)."""
    b, c, h, w = features.shape
    tokens = features.permute(0, 2, 3, 1).reshape(b, h * w, c)
    filled = fill_masked_tokens(tokens, 1.0 - visible.reshape(b, h * w), mask_token, mask_token_type)
    return filled.reshape(b, h, w, c).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- batch norm
def _all_reduce(tensor, process_group):
    """Sum over the processes, differentiably (the gradient of each process's share flows back to it)."""
    from torch.distributed.nn.functional import all_reduce  # only where torch.distributed is available and running

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` (same parameters, buffers and state-dict keys) that takes an optional visible map.

    With `visible` `(B, 1, h, w)`, training statistics cover the visible positions only and masked outputs are 0
    (SparK's `SparseBatchNorm2d`, written densely: no boolean indexing, so no data-dependent shapes). With
    `synchronized` (set by `convert_to_sync_batchnorm`) and more than one process, training statistics are summed over
    the processes, as `nn.SyncBatchNorm`. Otherwise, exactly `nn.BatchNorm2d`.
    """

    synchronized = False
    process_group = None

    def forward(self, features, visible=None):
        synced = self.synchronized and dist.is_available() and dist.is_initialized()
        synced = synced and dist.get_world_size(self.process_group) > 1
        if not self.training or (visible is None and not synced):
            out = super().forward(features)
            return out if visible is None else out * visible
        # statistics in (at least) float32 whatever the model's dtype, as cuDNN computes them for bf16/fp16 inputs
        precise = features.to(torch.promote_types(features.dtype, torch.float32))
        mean, var, count = self._batch_moments(precise, visible, synced)
        self._update_running_stats(mean, var, count)
        scale = torch.rsqrt(var + self.eps) * self.weight
        out = (precise - mean[:, None, None]) * scale[:, None, None] + self.bias[:, None, None]
        out = out.to(features.dtype)
        return out if visible is None else out * visible

    def _batch_moments(self, features, visible, synced):
        """Mean and (biased) variance per channel over the visible positions of all processes, and their count."""
        if visible is None:
            visible = features.new_ones(features.shape[0], 1, *features.shape[2:])
        visible = visible.to(features.dtype)
        group = self.process_group
        weighted = features * visible
        totals = torch.cat([visible.sum().reshape(1), weighted.sum(dim=(0, 2, 3))])
        if synced:
            totals = _all_reduce(totals, group)
        count = totals[0]
        mean = totals[1:] / count.clamp(min=1.0)
        squares = ((features - mean[:, None, None]) * visible).square().sum(dim=(0, 2, 3))
        if synced:
            squares = _all_reduce(squares, group)
        return mean, squares / count.clamp(min=1.0), count

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        if self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1.0).clamp(min=1.0)
        # a batch with no visible position at this resolution has no statistics: it must not pull them to 0
        weight = (count > 0).to(self.running_mean.dtype) * momentum
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), weight)
        self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), weight)


def convert_to_sync_batchnorm(module, process_group=None):
    """Make every `MaskedBatchNorm2d` in `module` synchronise its training statistics across processes (the CNN
    encoders' and the hierarchical decoder's only batch norms). Use this, not `nn.SyncBatchNorm.
    convert_sync_batchnorm`, which would replace them by modules that cannot skip masked positions. Returns the
    number of layers converted."""
    converted = 0
    for layer in module.modules():
        if isinstance(layer, MaskedBatchNorm2d):
            layer.synchronized, layer.process_group = True, process_group
            converted += 1
    return converted


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a `(B, C, h, w)` map (ConvNeXt's `channels_first`); with `visible`, masked
    outputs are 0 (SparK's sparse LayerNorm: the statistics are per position, so nothing else changes)."""

    def forward(self, features, visible=None):
        out = super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out if visible is None else out * visible


# ---------------------------------------------------------------------------------------------- encoder base
class MaskedConvEncoder(nn.Module):
    """What the ResNet and ConvNeXt encoders share: pixel fill, mask token or sparse masking, stage outputs, and the
    hooks `SimMIMModel` and the optimizer read. Subclasses build `stem`, `stages` (each called as
    `stage(features, visible)`), `mask_token` and `mask_strides` (the strides of every feature map a layer masks,
    1 = the input)."""

    def __init__(self, config):
        super().__init__()
        check_conv_encoder_config(config)
        self.config = config

    def build_mask_token(self, use_mask_token, width):
        """The learned mask token, in `token` mode only: in `sparse` mode masked positions stay 0 in the encoder."""
        config = self.config
        learned = use_mask_token and config.conv_masking == "token" and config.mask_token_type == "learned"
        return nn.Parameter(torch.zeros(1, 1, width)) if learned else None

    def forward(self, pixel_values, bool_masked_pos=None, output_hidden_states=False, output_attentions=False):
        """pixel_values `(B, C, H, W)`; bool_masked_pos `(B, g, g)` bool (True = masked) or None. Returns a
        `BaseModelOutput`: the final map `(B, C_last, H / stride, W / stride)` and, on request, the stem output (after
        masking) and every stage's output (`hidden_states`, as transformers' ResNet / ConvNext)."""
        if output_attentions:
            raise ValueError("output_attentions=True: convolutional encoders have no attention weights.")
        visible = None
        if bool_masked_pos is not None:
            visible = visible_pyramid(
                bool_masked_pos, pixel_values.shape[-2:], self.mask_strides, pixel_values.dtype
            )
            pixel_values = pixel_values * visible_for(visible, pixel_values)
        sparse = visible if self.config.conv_masking == "sparse" else None
        features = self.stem(pixel_values, sparse)
        if visible is not None and sparse is None:
            features = fill_masked_positions(
                features, visible_for(visible, features), self.mask_token, self.config.mask_token_type
            )
        hidden_states = [features]
        for stage in self.stages:
            features = stage(features, sparse)
            hidden_states.append(features)
        return BaseModelOutput(
            last_hidden_state=features, hidden_states=tuple(hidden_states) if output_hidden_states else None
        )

    def feature_map(self, last_hidden_state):
        """The decoder's input: the final map itself, `(B, C, H / stride, W / stride)`."""
        return last_hidden_state

    def patch_tokens(self, last_hidden_state):
        """`(B, C, h, w)` -> `(B, h * w, C)`, for the pooler's average."""
        return last_hidden_state.flatten(2).transpose(1, 2)

    def no_weight_decay(self):
        """Parameter names exempt from weight decay by name: the mask token, as SparK's pretraining exempts it."""
        return {"mask_token"}

    def no_weight_decay_keywords(self):
        """Substrings exempting parameters from weight decay in fine-tuning: none unless a subclass says so."""
        return set()


# ---------------------------------------------------------------------------------------------- decoder
class UpsamplingBlock(nn.Module):
    """SparK's `UNetBlock`: 2x transposed convolution, then two 3x3 convolutions with batch norm."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1)
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False)
        self.norm1 = MaskedBatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = MaskedBatchNorm2d(out_channels)

    def forward(self, features):
        features = F.relu6(self.norm1(self.conv1(self.upsample(features))))
        return self.norm2(self.conv2(features))


class Densify(nn.Module):
    """One encoder stage's map made dense for the decoder (SparK's densify step): normalised (over visible positions
    in `sparse` mode), masked positions filled with this scale's mask token (`sparse` mode only: in `token` mode the
    encoder already filled them), projected to the decoder's width at that scale."""

    def __init__(self, channels, out_channels, kernel_size, norm, sparse):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, channels, 1, 1)) if sparse else None
        self.norm = norm
        self.proj = nn.Conv2d(channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, features, visible=None):
        features = self.norm(features, visible)
        if self.mask_token is not None and visible is not None:
            features = torch.where(visible.bool(), features, self.mask_token.to(features.dtype))
        return self.proj(features)


def densify_norm(config, channels):
    """SparK's densify norm: batch norm for ResNet, LayerNorm (eps 1e-6) for ConvNeXt."""
    if config.backbone == "resnet":
        return MaskedBatchNorm2d(channels)
    return ChannelsFirstLayerNorm(channels, eps=1e-6)


class HierarchicalDecoder(nn.Module):
    """SparK's light decoder over the stage outputs: from the coarsest map, `log2(encoder_stride)` upsampling blocks
    halve the width (`decoder_hidden_size`, then /2, /4, ...); before each of the first `len(hidden_sizes)` blocks the
    densified stage output of that scale is added. A 1x1 convolution gives the `(B, num_channels, H, W)` pixels.

    Reads `hidden_sizes`, `encoder_stride`, `decoder_hidden_size`, `num_channels`, `conv_masking` and `backbone`
    (densify norm: batch norm for ResNet, LayerNorm for ConvNeXt, as SparK).
    """

    def __init__(self, config):
        super().__init__()
        num_blocks = hierarchical_decoder_blocks(config)
        width = config.decoder_hidden_size
        self.sparse = config.conv_masking == "sparse"
        channels = [width // 2**k for k in range(num_blocks + 1)]
        stage_widths = list(reversed(config.hidden_sizes))
        self.densify = nn.ModuleList(
            [
                Densify(c, channels[k], 1 if k == 0 else 3, densify_norm(config, c), self.sparse)
                for k, c in enumerate(stage_widths)
            ]
        )
        self.blocks = nn.ModuleList([UpsamplingBlock(channels[k], channels[k + 1]) for k in range(num_blocks)])
        self.proj = nn.Conv2d(channels[-1], config.num_channels, kernel_size=1)
        init_module_tree(self, init_hierarchical_decoder_layer, config)

    def forward(self, stage_outputs, bool_masked_pos=None):
        """stage_outputs: every stage's output, finest first (the encoder's `hidden_states[1:]`)."""
        coarse_first = list(reversed(stage_outputs))
        features = 0.0
        for k, block in enumerate(self.blocks):
            if k < len(coarse_first):
                stage = coarse_first[k]
                visible = None
                if self.sparse and bool_masked_pos is not None:
                    visible = visible_at(bool_masked_pos, stage.shape[-2:]).to(stage.dtype)
                features = features + self.densify[k](stage, visible)
            features = block(features)
        return self.proj(features)

    def no_weight_decay(self):
        """Parameter names (relative to the decoder) exempt from weight decay: the mask tokens, as SparK's
        pretraining exempts every `mask_token` by name."""
        return {name for name, _ in self.named_parameters() if name.endswith("mask_token")}


def init_batch_norm(norm):
    """A fresh batch norm: weight 1, bias 0, running statistics of a standard normal, no batches seen."""
    init.ones_(norm.weight)
    init.zeros_(norm.bias)
    init.zeros_(norm.running_mean)
    init.ones_(norm.running_var)
    init.zeros_(norm.num_batches_tracked)


def init_module_tree(root, rule, config):
    """Initialise every module of `root` by `rule(module, config)` and tag it with `rule` (`module.init_rule`), which
    `SimMIMPreTrainedModel._init_weights` applies again: transformers initialises a model one module at a time, and
    skips the containers that hold no tensor of their own, so each module must know its rule."""
    for module in root.modules():
        module.init_rule = rule
        rule(module, config)


def init_hierarchical_decoder_layer(module, config=None):
    """SparK's decoder init: convolutions truncated normal (std 0.02, bias 0), transposed convolutions Kaiming normal
    (fan out, ReLU, bias 0), norms 1 and 0, mask tokens truncated normal within +-0.02."""
    if isinstance(module, nn.ConvTranspose2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        init_batch_norm(module)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, Densify) and module.mask_token is not None:
        init.trunc_normal_(module.mask_token, std=0.02, a=-0.02, b=0.02)
