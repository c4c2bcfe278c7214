"""The ResNet encoder (transformers' `ResNetModel` layout: microsoft/resnet-50 and its family) for SimMIM, with the
masking of `modeling_conv_masking`.

Stem: 7x7 convolution (stride 2) + batch norm + activation + 3x3 max pooling (stride 2), so the first stage sees
stride 4; each later stage halves the resolution in its first layer. Module names follow transformers' own below the
stem (`stages.{i}.layers.{j}.layer.{k}.convolution`, `.normalization`, `.shortcut`), so weights convert by prefix
(`convert/cnn_weights.py`).

Config fields read: `num_channels`, `embedding_size` (stem width), `hidden_sizes` (output width of each stage),
`depths` (layers per stage), `layer_type` (`"bottleneck"` or `"basic"`), `hidden_act`, `drop_path_rate`
(stochastic depth on each residual branch, rising linearly over the layers to it, as timm's ResNet, which SparK
fine-tunes), `conv_masking`, `mask_token_type`, `initializer_range`.
"""

import math

from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_simmim import check_resnet_config
from .modeling_conv_masking import (
    MaskedBatchNorm2d,
    MaskedConvEncoder,
    init_batch_norm,
    init_module_tree,
    visible_for,
)
from .modeling_layers import DropPath, stage_drop_path_rates

# transformers' bottleneck: the 3x3 convolution runs at out_channels / 4.
BOTTLENECK_REDUCTION = 4
# SparK's fine-tuning layer ids (downstream_imagenet/models/__init__.py `resnets_get_layer_id_and_scale_exp`): by the
# depths of the second and third stages (ResNet-50/34, 101, 152, 200, ECA-269), how many consecutive blocks of each
# share a layer id.
SPARK_BLOCKS_PER_LAYER_ID = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4), (30, 48): (5, 6)}


class ResNetConvLayer(nn.Module):
    """Convolution (no bias) + batch norm (over visible positions in `sparse` mode) + optional activation."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, activation="relu"):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = MaskedBatchNorm2d(out_channels)
        self.activation = ACT2FN[activation] if activation is not None else nn.Identity()

    def forward(self, features, visible=None):
        features = self.convolution(features)
        return self.activation(self.normalization(features, visible_for(visible, features)))


class ResNetResidualLayer(nn.Module):
    """A basic (two 3x3 convolutions) or bottleneck (1x1, 3x3, 1x1) residual layer; the 3x3 convolution carries the
    stride, and a 1x1 convolution + batch norm shortcut matches a change of width or resolution. The residual
    branch is dropped per sample with probability `drop_path` in training."""

    def __init__(self, config, in_channels, out_channels, stride=1, drop_path=0.0):
        super().__init__()
        act = config.hidden_act
        if config.layer_type == "bottleneck":
            reduced = out_channels // BOTTLENECK_REDUCTION
            convolutions = [
                ResNetConvLayer(in_channels, reduced, kernel_size=1, activation=act),
                ResNetConvLayer(reduced, reduced, stride=stride, activation=act),
                ResNetConvLayer(reduced, out_channels, kernel_size=1, activation=None),
            ]
        else:
            convolutions = [
                ResNetConvLayer(in_channels, out_channels, stride=stride, activation=act),
                ResNetConvLayer(out_channels, out_channels, activation=None),
            ]
        self.layer = nn.ModuleList(convolutions)
        needs_shortcut = in_channels != out_channels or stride != 1
        self.shortcut = (
            ResNetConvLayer(in_channels, out_channels, kernel_size=1, stride=stride, activation=None)
            if needs_shortcut
            else None
        )
        self.drop_path = DropPath(drop_path)
        self.activation = ACT2FN[act]

    def forward(self, features, visible=None):
        residual = features if self.shortcut is None else self.shortcut(features, visible)
        for convolution in self.layer:
            features = convolution(features, visible)
        return self.activation(self.drop_path(features) + residual)


class ResNetStage(GradientCheckpointingLayer):
    def __init__(self, config, in_channels, out_channels, stride, depth, drop_paths):
        super().__init__()
        self.layers = nn.ModuleList(
            [ResNetResidualLayer(config, in_channels, out_channels, stride, drop_paths[0])]
            + [ResNetResidualLayer(config, out_channels, out_channels, 1, drop_paths[j]) for j in range(1, depth)]
        )

    def forward(self, features, visible=None):
        for layer in self.layers:
            features = layer(features, visible)
        return features


class ResNetStem(nn.Module):
    """7x7 convolution (stride 2) + batch norm + activation + 3x3 max pooling (stride 2). In `sparse` mode the
    pooled map is masked again, as SparK's sparse max pooling; pooling windows at visible positions reach masked ones,
    which hold 0: after ReLU no visible value is below it, so the max is that of the visible positions alone."""

    def __init__(self, config):
        super().__init__()
        self.convolution = nn.Conv2d(
            config.num_channels, config.embedding_size, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.normalization = MaskedBatchNorm2d(config.embedding_size)
        self.activation = ACT2FN[config.hidden_act]
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, pixel_values, visible=None):
        features = self.convolution(pixel_values)
        features = self.pooler(self.activation(self.normalization(features, visible_for(visible, features))))
        return features if visible is None else features * visible_for(visible, features)


class ResNetEncoder(MaskedConvEncoder):
    """Stem -> (mask token at stride 4, `token` mode) -> stages. See `MaskedConvEncoder.forward` for the outputs.

    `token` mode leaks nothing of the masked pixels (they are 0 before the stem), but the stem's receptive field is
    11 pixels at stride 4: the visible positions next to a masked region see its filled pixels (up to 5 pixels before
    and 2 past their 4x4 cell), and BatchNorm statistics include the mask tokens.
    """

    def __init__(self, config, use_mask_token=True):
        super().__init__(config)
        check_resnet_config(config)
        self.stem = ResNetStem(config)
        self.mask_token = self.build_mask_token(use_mask_token, config.embedding_size)
        widths = [config.embedding_size] + list(config.hidden_sizes)
        rates = stage_drop_path_rates(config.drop_path_rate, config.depths)
        self.stages = nn.ModuleList(
            [
                ResNetStage(config, widths[i], widths[i + 1], 1 if i == 0 else 2, depth, rates[i])
                for i, depth in enumerate(config.depths)
            ]
        )
        self.mask_strides = (1, 2) + tuple(4 * 2**i for i in range(len(config.depths)))
        init_module_tree(self, init_resnet_layer, config)

    def num_layers(self):
        """Layer ids of layer-wise learning-rate decay: the stem, the stages' (see `layer_id`), the head."""
        return self._first_layer_ids()[-1] + 1

    def layer_id(self, name):
        """SparK's ResNet layer ids: 0 for the stem (and the mask token); the first stage 1; in the second and third
        stages of the depths SparK lists (`SPARK_BLOCKS_PER_LAYER_ID`, e.g. ResNet-50: blocks of 2 and 3), one id per
        group of consecutive blocks; the last stage one id; anything after the stages (the head) the last id. Other
        depths: one id per stage."""
        if name == "mask_token" or name.startswith("stem."):
            return 0
        if name.startswith("stages."):
            stage, block = (int(part) for part in name.split(".")[1:4:2])
            return self._first_layer_ids()[stage] + block // self._blocks_per_layer_id()[stage]
        return self.num_layers() - 1

    def _blocks_per_layer_id(self):
        depths = list(self.config.depths)
        grouped = SPARK_BLOCKS_PER_LAYER_ID.get(tuple(depths[1:3])) if len(depths) == 4 else None
        return [depths[0], *grouped, depths[3]] if grouped else depths

    def _first_layer_ids(self):
        """The first layer id of each stage, then the head's."""
        ids = [1]
        for depth, per_id in zip(self.config.depths, self._blocks_per_layer_id()):
            ids.append(ids[-1] + math.ceil(depth / per_id))
        return ids


def init_resnet_layer(module, config):
    """transformers' ResNet init: convolutions Kaiming normal (fan out, ReLU), batch norms fresh; the mask token
    truncated normal (std `initializer_range`, as SimMIM's Swin)."""
    if isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        init_batch_norm(module)
    elif isinstance(module, ResNetEncoder) and module.mask_token is not None:
        init.trunc_normal_(module.mask_token, std=config.initializer_range)
