"""SimMIMImageProcessor: the preprocessing a checkpoint carries (`preprocessor_config.json`).

Evaluation preprocessing (RGB, resize + centre crop to the model's image size, normalise) and, on request, a
SimMIM mask per image, so `processor(images, return_bool_masked_pos=True)` feeds `SimMIMForMaskedImageModeling`
directly. Relative imports only: a checkpoint saved with its code (`trust_remote_code`) carries this file.
"""

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .image_transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resize_center_crop, to_normalized_array, to_rgb
from .masking import SimMIMMaskGenerator


RESAMPLING_FILTERS = {int(f): f.name.lower() for f in Image.Resampling}


def resampling_filter(name, value):
    """A PIL resampling filter given as its number (as `preprocessor_config.json` stores it) or name."""
    if isinstance(value, str) and value.upper() in Image.Resampling.__members__:
        return int(Image.Resampling[value.upper()])
    if not isinstance(value, bool) and isinstance(value, int) and value in RESAMPLING_FILTERS:
        return int(value)
    choices = ", ".join(f"{number} ({label})" for number, label in sorted(RESAMPLING_FILTERS.items()))
    raise ValueError(f"{name}={value!r} is not a PIL resampling filter: use one of {choices}.")


class SimMIMImageProcessor(BaseImageProcessor):
    """Inference preprocessing of a SimMIM checkpoint: RGB, resize the shorter side to `image_size / crop_pct`,
    centre crop `image_size`, normalise; and on request a SimMIM mask per image (`return_bool_masked_pos=True`).

    Training augmentation is not held here: it is a named preset of `hf_simmim.data.augmentation`, derived from the
    model config by each run and recorded in its model card.
    """

    model_input_names = ["pixel_values"]
    # Training settings that processors of hf_simmim 0.1 saved; they are read and dropped (see the class docstring).
    LEGACY_TRAINING_KEYS = ("crop_scale", "crop_ratio", "hflip_prob", "train_resample", "rand_augment", "random_erasing")

    def __init__(
        self,
        image_size=224,
        crop_pct=1.0,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        patch_size=16,
        mask_patch_size=32,
        mask_ratio=0.6,
        resample=Image.BICUBIC,
        **kwargs,
    ):
        for key in self.LEGACY_TRAINING_KEYS:
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1] (e.g. 0.875 for resize 256 / crop 224).")
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.patch_size = patch_size
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        # bicubic, as timm and the official evaluation
        self.resample = resampling_filter("resample", resample)

    @classmethod
    def from_model_config(cls, config, **kwargs):
        """The processor that matches a `SimMIMConfig` (image size, patch and mask settings)."""
        return cls(
            image_size=config.image_size,
            patch_size=config.patch_size,
            mask_patch_size=config.mask_patch_size,
            mask_ratio=config.mask_ratio,
            **kwargs,
        )

    def mask_generator(self, seed=None):
        return SimMIMMaskGenerator(self.image_size, self.mask_patch_size, self.patch_size, self.mask_ratio, seed=seed)

    def preprocess_image(self, image):
        """One image (any PIL mode or HWC array) -> normalised float32 CHW array of the model's size."""
        image = resize_center_crop(to_rgb(image), self.image_size, self.crop_pct, self.resample)
        return to_normalized_array(image, self.image_mean, self.image_std)

    def __call__(self, images, **kwargs):
        return self.preprocess(images, **kwargs)

    def preprocess(self, images, return_tensors="pt", return_bool_masked_pos=False, mask_seed=None, **kwargs):
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("images is empty: pass at least one image.")
        pixel_values = np.stack([self.preprocess_image(image) for image in images])
        data = {"pixel_values": pixel_values}
        if return_bool_masked_pos:
            generator = self.mask_generator(seed=mask_seed)
            data["bool_masked_pos"] = np.stack([generator() for _ in images])
        if return_tensors in ("pt", None):
            data = {k: torch.from_numpy(v) for k, v in data.items()}
            return BatchFeature(data=data)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self):
        output = super().to_dict()
        for key in ("_valid_kwargs_names", "_valid_processor_keys"):
            output.pop(key, None)
        return output
