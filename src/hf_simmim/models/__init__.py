"""What a SimMIM checkpoint carries for `trust_remote_code`: the configuration, the encoders and heads, and the
image processor. These files import each other only relatively and nothing else of hf_simmim."""

from .configuration_simmim import PRESETS, SimMIMConfig
from .image_processing_simmim import SimMIMImageProcessor
from .masking import MASK_STRATEGIES, SimMIMMaskGenerator, mask_generator_for
from .modeling_simmim import (
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMModel,
    SimMIMPreTrainedModel,
    simmim_loss,
)

__all__ = [
    "MASK_STRATEGIES",
    "PRESETS",
    "SimMIMConfig",
    "SimMIMImageProcessor",
    "SimMIMMaskGenerator",
    "SimMIMModel",
    "SimMIMPreTrainedModel",
    "SimMIMForMaskedImageModeling",
    "SimMIMForImageClassification",
    "simmim_loss",
    "mask_generator_for",
]
