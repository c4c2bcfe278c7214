"""The ConvNeXt encoder, V1 (layer scale) and V2 (GRN, no layer scale), in transformers' `ConvNextModel` /
`ConvNextV2Model` layout (facebook/convnext-tiny-224, facebook/convnextv2-tiny-1k-224), with the masking of
`modeling_conv_masking`.

Stem: `patch_size` x `patch_size` convolution with that stride (a patchify stem: no overlap, so nothing crosses a
mask boundary at stride 4) + LayerNorm. Each later stage starts with LayerNorm + 2x2 convolution (stride 2). A block:
7x7 depthwise convolution, LayerNorm, Linear 4x, activation, (V2: GRN), Linear, (V1: layer scale), drop path, residual.
The final LayerNorm of transformers' model normalises the pooled output only: it is the pooler's (`pooler.fc_norm`).

Config fields read: `num_channels`, `patch_size` (stem kernel and stride), `hidden_sizes`, `depths`, `hidden_act`,
`drop_path_rate`, `layer_scale_init_value` (V1; 0 disables; V2 needs 0), `convnext_version` (1 or 2),
`layer_decay_type` (`"group"` or `"single"`), `conv_masking`, `mask_token_type`, `initializer_range`.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_simmim import check_convnext_config
from .modeling_conv_masking import ChannelsFirstLayerNorm, MaskedConvEncoder, init_module_tree, visible_for
from .modeling_layers import DropPath, stage_drop_path_rates

# transformers and the official code fix the eps of every LayerNorm inside the encoder.
CONVNEXT_LAYER_NORM_EPS = 1e-6
# The official "group" layer decay: 12 groups for depths [3, 3, 27, 3] (ConvNeXt optim_factory).
GROUP_LAYER_IDS = 14


class ConvNextGRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) on a channels-last `(B, h, w, C)` map. With `visible`
    `(B, h, w, 1)`, each sample's norms cover its visible positions only."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, features, visible=None):
        if visible is not None:
            features = features * visible
        global_features = torch.linalg.vector_norm(features, ord=2, dim=(1, 2), keepdim=True)
        norm_features = global_features / (global_features.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (features * norm_features) + self.bias + features


class ConvNextLayer(nn.Module):
    """One ConvNeXt block. In `sparse` mode its residual branch is zeroed at masked positions (the input already is
    0 there), and GRN sees visible positions only; every other step works per position."""

    def __init__(self, config, dim, drop_path):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=CONVNEXT_LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.grn = ConvNextGRN(4 * dim) if config.convnext_version == 2 else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        scale = config.layer_scale_init_value
        self.layer_scale_parameter = nn.Parameter(torch.full((dim,), float(scale))) if scale > 0 else None
        self.drop_path = DropPath(drop_path)

    def forward(self, features, visible=None):
        visible = visible_for(visible, features)
        branch = self.dwconv(features).permute(0, 2, 3, 1)
        branch = self.act(self.pwconv1(self.layernorm(branch)))
        if self.grn is not None:
            branch = self.grn(branch, None if visible is None else visible.permute(0, 2, 3, 1))
        branch = self.pwconv2(branch)
        if self.layer_scale_parameter is not None:
            branch = self.layer_scale_parameter * branch
        branch = branch.permute(0, 3, 1, 2)
        if visible is not None:
            branch = branch * visible
        return features + self.drop_path(branch)


class ConvNextStage(GradientCheckpointingLayer):
    """(LayerNorm + 2x2 stride-2 convolution, from the second stage on) + blocks."""

    def __init__(self, config, in_channels, out_channels, stride, depth, drop_paths):
        super().__init__()
        downsamples = in_channels != out_channels or stride > 1
        self.downsampling_layer = nn.ModuleList(
            [
                ChannelsFirstLayerNorm(in_channels, eps=CONVNEXT_LAYER_NORM_EPS),
                nn.Conv2d(in_channels, out_channels, kernel_size=stride, stride=stride),
            ]
            if downsamples
            else []
        )
        self.layers = nn.ModuleList([ConvNextLayer(config, out_channels, drop_paths[j]) for j in range(depth)])

    def forward(self, features, visible=None):
        if len(self.downsampling_layer):
            norm, convolution = self.downsampling_layer
            features = convolution(norm(features, visible_for(visible, features)))
            if visible is not None:
                features = features * visible_for(visible, features)
        for layer in self.layers:
            features = layer(features, visible)
        return features


class ConvNextStem(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, patch = config.hidden_sizes[0], config.patch_size
        self.convolution = nn.Conv2d(config.num_channels, width, kernel_size=patch, stride=patch)
        self.normalization = ChannelsFirstLayerNorm(width, eps=CONVNEXT_LAYER_NORM_EPS)

    def forward(self, pixel_values, visible=None):
        features = self.convolution(pixel_values)
        return self.normalization(features, visible_for(visible, features))


class ConvNextEncoder(MaskedConvEncoder):
    """Stem -> (mask token, `token` mode) -> stages. See `MaskedConvEncoder.forward` for the outputs."""

    def __init__(self, config, use_mask_token=True):
        super().__init__(config)
        check_convnext_config(config)
        self.stem = ConvNextStem(config)
        self.mask_token = self.build_mask_token(use_mask_token, config.hidden_sizes[0])
        rates = stage_drop_path_rates(config.drop_path_rate, config.depths)
        widths = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.stages = nn.ModuleList(
            [
                ConvNextStage(config, widths[i], widths[i + 1], 1 if i == 0 else 2, depth, rates[i])
                for i, depth in enumerate(config.depths)
            ]
        )
        self.mask_strides = (1,) + tuple(config.patch_size * 2**i for i in range(len(config.depths)))
        init_module_tree(self, init_convnext_layer, config)

    def no_weight_decay_keywords(self):
        """ConvNeXt V2 fine-tuning exempts GRN's scale (`.gamma`, transformers' `grn.weight`) by name; its bias is
        exempt as any bias. Applied in fine-tuning only: FCMAE pretraining decays it."""
        return {"grn.weight"} if self.config.convnext_version == 2 else set()

    def num_layers(self):
        if self.config.layer_decay_type == "group":
            return GROUP_LAYER_IDS
        return sum(self.config.depths) + 2

    def layer_id(self, name):
        """The official layer id of a parameter name relative to the encoder: ConvNeXt's `get_num_layer_for_convnext`
        (`"group"`) or ConvNeXt V2's `get_num_layer_for_convnext_single` (`"single"`). The stem is the official
        `downsample_layers.0` (the mask token goes with it), `stages.{i}.downsampling_layer` is
        `downsample_layers.{i}`, `stages.{i}.layers.{j}` is `stages.{i}.{j}`; anything else is the last id."""
        parts = name.split(".")
        if name == "mask_token" or parts[0] == "stem":
            return self._downsampling_layer_id(0)
        if parts[0] == "stages" and parts[2] == "downsampling_layer":
            return self._downsampling_layer_id(int(parts[1]))
        if parts[0] == "stages":
            return self._block_layer_id(int(parts[1]), int(parts[3]))
        return self.num_layers() - 1

    def _downsampling_layer_id(self, stage):
        if self.config.layer_decay_type == "single":
            return sum(self.config.depths[:stage]) + 1
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage]

    def _block_layer_id(self, stage, block):
        if self.config.layer_decay_type == "single":
            return sum(self.config.depths[:stage]) + block + 1
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]


def init_convnext_layer(module, config):
    """The official ConvNeXt init: convolutions and Linear layers truncated normal (std `initializer_range`, 0.02),
    biases 0, LayerNorms 1 and 0, layer scale `layer_scale_init_value`, GRN 0; the mask token as SimMIM's Swin."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        init.trunc_normal_(module.weight, std=config.initializer_range)
        init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, ConvNextGRN):
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, ConvNextLayer) and module.layer_scale_parameter is not None:
        init.constant_(module.layer_scale_parameter, config.layer_scale_init_value)
    elif isinstance(module, ConvNextEncoder) and module.mask_token is not None:
        init.trunc_normal_(module.mask_token, std=config.initializer_range)
