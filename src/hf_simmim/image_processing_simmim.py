"""SimMIMImageProcessor: the preprocessing a checkpoint carries (`preprocessor_config.json`).

Evaluation preprocessing (RGB, resize + centre crop to the model's image size, normalise) and, on request, a
SimMIM mask per image, so `processor(images, return_bool_masked_pos=True)` feeds `SimMIMForMaskedImageModeling`
directly. It also records the training augmentation of the paper so a run can be rebuilt from a checkpoint.
"""

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .augmentation import parse_rand_augment
from .image_transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resize_center_crop, to_normalized_array, to_rgb
from .masking import SimMIMMaskGenerator


RESAMPLING_FILTERS = {int(f): f.name.lower() for f in Image.Resampling}


def _resampling_filter(name, value):
    """A PIL resampling filter given as its number (as `preprocessor_config.json` stores it) or name."""
    if isinstance(value, str) and value.upper() in Image.Resampling.__members__:
        return int(Image.Resampling[value.upper()])
    if not isinstance(value, bool) and isinstance(value, int) and value in RESAMPLING_FILTERS:
        return int(value)
    choices = ", ".join(f"{number} ({label})" for number, label in sorted(RESAMPLING_FILTERS.items()))
    raise ValueError(f"{name}={value!r} is not a PIL resampling filter: use one of {choices}.")


class SimMIMImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size=224,
        crop_pct=1.0,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        patch_size=16,
        mask_patch_size=32,
        mask_ratio=0.6,
        crop_scale=(0.67, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        hflip_prob=0.5,
        resample=Image.BICUBIC,
        train_resample=Image.BILINEAR,
        rand_augment=None,
        random_erasing=0.0,
        **kwargs,
    ):
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
        self.crop_scale = list(crop_scale)
        self.crop_ratio = list(crop_ratio)
        self.hflip_prob = hflip_prob
        # PIL resampling filters: `resample` for the evaluation resize (bicubic, as timm and the official
        # evaluation), `train_resample` for the training RandomResizedCrop (bilinear, torchvision's default, which
        # the official pretraining uses; fine-tuning sets bicubic, as the official fine-tuning).
        self.resample = _resampling_filter("resample", resample)
        self.train_resample = _resampling_filter("train_resample", train_resample)
        # fine-tuning only (the official: "rand-m9-mstd0.5-inc1" and 0.25); SimMIM pretraining uses neither
        if rand_augment is not None:
            parse_rand_augment(rand_augment)  # refuses a malformed policy now, not in a DataLoader worker
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing={random_erasing} is a probability: give a value in [0, 1] (official 0.25).")
        self.rand_augment = rand_augment
        self.random_erasing = random_erasing

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
