"""hf_simmim: SimMIM (Xie et al., CVPR 2022) as Hugging Face transformers models.

Importing the package registers `SimMIMConfig`, the models and the image processor with the Auto classes, and the
inpainting pipeline with transformers' pipelines: `pipeline("image-inpainting", model=CHECKPOINT)`.

Layout (arrows point one way: models <- data <- training <- scripts):
- `hf_simmim.models`: configuration, encoders and heads, image processor (what a checkpoint carries);
- `hf_simmim.data`: image operations, augmentation presets, the datasets transform, loading, checks;
- `hf_simmim.training`: arguments, recipes, parameter groups, schedules, trainers, callbacks, fine-tuning, probing;
- `hf_simmim.convert`, `hf_simmim.reporting`, `hf_simmim.metrics`, `hf_simmim.cli`: around them.
"""

import logging

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)
from transformers.pipelines import PIPELINE_REGISTRY

from . import models
from .models import (  # noqa: F401  (the public names: __all__ below)
    MASK_STRATEGIES,
    PRESETS,
    SimMIMConfig,
    SimMIMImageProcessor,
    SimMIMMaskGenerator,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMModel,
    SimMIMPreTrainedModel,
    mask_generator_for,
    simmim_loss,
)
from .models.pipeline_simmim import INPAINTING_TASK, InpaintingInputError, SimMIMInpaintingPipeline

__version__ = "0.1.0"

AutoConfig.register(SimMIMConfig.model_type, SimMIMConfig, exist_ok=True)
AutoModel.register(SimMIMConfig, SimMIMModel, exist_ok=True)
AutoModelForMaskedImageModeling.register(SimMIMConfig, SimMIMForMaskedImageModeling, exist_ok=True)
AutoModelForImageClassification.register(SimMIMConfig, SimMIMForImageClassification, exist_ok=True)
try:  # the processor is on the PIL backend: there is no torchvision one
    AutoImageProcessor.register(SimMIMConfig, image_processor_classes={"pil": SimMIMImageProcessor}, exist_ok=True)
except Exception as error:  # e.g. transformers releases whose AutoImageProcessor needs torchvision
    logging.getLogger(__name__).warning(
        "AutoImageProcessor registration skipped (%s); use SimMIMImageProcessor.from_pretrained directly.", error
    )

# Saved checkpoints carry this code, so `trust_remote_code=True` loads them where hf_simmim is not installed.
SimMIMConfig.register_for_auto_class()
SimMIMModel.register_for_auto_class("AutoModel")
SimMIMForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
SimMIMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
SimMIMImageProcessor.register_for_auto_class("AutoImageProcessor")

# `pipeline(INPAINTING_TASK, ...)`; the model class is named by its transformers Auto class, which is what a checkpoint
# saved with the pipeline (`pipeline.save_pretrained`) can name in its config.json for `trust_remote_code`.
PIPELINE_REGISTRY.register_pipeline(
    INPAINTING_TASK, pipeline_class=SimMIMInpaintingPipeline, pt_model=AutoModelForMaskedImageModeling, type="image"
)

__all__ = [*models.__all__, "INPAINTING_TASK", "InpaintingInputError", "SimMIMInpaintingPipeline"]
