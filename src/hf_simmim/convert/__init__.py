"""Checkpoints in and out: official SimMIM `.pth` files (`official`: microsoft/SimMIM's ViT and Swin,
microsoft/Swin-Transformer's SwinV2), transformers' ViT/Swin/Swinv2 MIM checkpoints and ResNet/ConvNext/ConvNextV2
models and classifiers (`transformers_checkpoints`, `cnn_weights`), and the export of our models to transformers' own
ViT, BEiT, Swin, Swinv2, ResNet, ConvNext and ConvNextV2 classes (`to_transformers`).

Every direction infers the architecture from the weights (and the transformers config where there is one), so no
hand-written config is needed; what a checkpoint cannot tell can be overridden by keyword.
"""

from .official import (
    UnsafeCheckpointError,
    config_from_official_state_dict,
    convert_official_checkpoint,
    convert_official_state_dict,
    load_official_checkpoint,
)
from .to_transformers import (
    export_checkpoint_to_transformers,
    export_to_transformers,
    load_simmim_checkpoint,
    transformers_config_from_simmim,
    transformers_image_processor,
)
from .transformers_checkpoints import (
    config_from_transformers,
    convert_transformers_checkpoint,
    convert_transformers_state_dict,
    load_transformers_checkpoint,
)

__all__ = [
    "UnsafeCheckpointError",
    "config_from_official_state_dict",
    "config_from_transformers",
    "convert_official_checkpoint",
    "convert_official_state_dict",
    "convert_transformers_checkpoint",
    "convert_transformers_state_dict",
    "export_checkpoint_to_transformers",
    "export_to_transformers",
    "load_official_checkpoint",
    "load_simmim_checkpoint",
    "load_transformers_checkpoint",
    "transformers_config_from_simmim",
    "transformers_image_processor",
]
