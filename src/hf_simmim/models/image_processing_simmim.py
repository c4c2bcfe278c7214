"""SimMIMImageProcessor: the preprocessing a checkpoint carries (`preprocessor_config.json`).

Evaluation preprocessing (RGB, resize + centre crop to the model's image size, rescale and normalise) and, on
request, a SimMIM mask per image, so `processor(images, return_bool_masked_pos=True, return_tensors="pt")` feeds
`SimMIMForMaskedImageModeling` directly; `processor(images, masks=masks, return_tensors="pt")` does the same with
the user's own masks (one per image, of its size), brought into the evaluation view and snapped to the patch grid
(`masking.evaluation_patch_mask`). A transformers image processor on the PIL backend (`PilBackend`, as transformers'
`*ImageProcessorPil` classes): it takes what they take (PIL, NumPy and torch images, channels first or last, uint8
or floats, single images, lists and 4-D batches), honours their per-call keywords, and returns NumPy arrays unless
`return_tensors` asks for tensors. There is no torchvision backend: torchvision is not a dependency.

Relative imports only: a checkpoint saved with its code (`trust_remote_code`) carries this file.
"""

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, ImageInput, infer_channel_dimension_format, is_scaled_image
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

from .image_transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    center_crop,
    map_channels,
    rescale_and_normalize,
    resize_shorter_side,
    shorter_side_size,
    to_rgb,
    to_rgb_array,
)
from .masking import bool_mask, evaluation_patch_mask, mask_generator_for

logger = logging.get_logger(__name__)

RESAMPLING_FILTERS = {int(f): f.name.lower() for f in Image.Resampling}


def resampling_filter(name, value):
    """A PIL resampling filter given as its number (as `preprocessor_config.json` stores it) or name."""
    if isinstance(value, str) and value.upper() in Image.Resampling.__members__:
        return int(Image.Resampling[value.upper()])
    if not isinstance(value, bool) and isinstance(value, int) and value in RESAMPLING_FILTERS:
        return int(value)
    choices = ", ".join(f"{number} ({label})" for number, label in sorted(RESAMPLING_FILTERS.items()))
    raise ValueError(f"{name}={value!r} is not a PIL resampling filter: use one of {choices}.")


def check_crop_pct(crop_pct):
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1] (e.g. 0.875 for resize 256 / crop 224).")


def square_side(size):
    """The side of the square `size` asks for: an int, or transformers' `{"height": s, "width": s}`."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    sides = {key: size[key] for key in ("height", "width") if size.get(key) is not None} if size else {}
    if len(sides) == 2 and sides["height"] == sides["width"] and len(dict(size)) == 2:
        return sides["height"]
    raise ValueError(
        f"size={dict(size) if size else size} is not a square: SimMIM crops the model's square input, so pass "
        "size as an int or {'height': s, 'width': s}."
    )


def channels_first(image, input_data_format, num_channels):
    """An HW, HWC or CHW NumPy array -> CHW (channels inferred among 1, 3, 4 and `num_channels` unless given)."""
    if image.ndim == 2:
        return image[None]
    if image.ndim != 3:
        raise ValueError(f"An image must be 2-D (HW) or 3-D (HWC or CHW), got an array of shape {image.shape}.")
    if input_data_format is None:
        counts = tuple(sorted({1, 3, 4, num_channels}))
        try:
            input_data_format = infer_channel_dimension_format(image, num_channels=counts)
        except ValueError:
            raise ValueError(
                f"Cannot tell the channel axis of an image of shape {image.shape} (neither end is one of {counts} "
                "channels): pass input_data_format='channels_first' or 'channels_last'."
            ) from None
    return image if ChannelDimension(input_data_format) == ChannelDimension.FIRST else np.moveaxis(image, -1, 0)


def processed_size(height, width, side, do_resize, crop_pct, do_center_crop):
    """`(height, width)` of an image of that size after `SimMIMImageProcessor.resize_crop_normalize`."""
    if do_center_crop:
        return side, side
    if do_resize:
        new_width, new_height = shorter_side_size(width, height, int(side / crop_pct))
        return new_height, new_width
    return height, width


def mask_list(masks):
    """`masks=` as a list: a single mask (a PIL image, a 2-D array or tensor) is a list of one, a 3-D array or
    tensor the list of its masks."""
    if isinstance(masks, (list, tuple)):
        return list(masks)
    return list(masks) if getattr(masks, "ndim", None) == 3 else [masks]


def check_masks_alone(masks, return_bool_masked_pos, mask_seed):
    """`masks=` gives `bool_masked_pos` itself: refuse the keywords that draw masks with it."""
    if masks is not None and return_bool_masked_pos:
        raise ValueError(
            "masks= and return_bool_masked_pos=True both ask for bool_masked_pos: pass masks alone to use your "
            "masks, or return_bool_masked_pos=True alone to draw SimMIM masks."
        )
    if masks is not None and mask_seed is not None:
        raise ValueError(
            f"mask_seed={mask_seed} seeds drawn masks, but masks= gives your own: drop mask_seed (or drop masks "
            "and pass return_bool_masked_pos=True with mask_seed to draw reproducible masks)."
        )


class SimMIMImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    image_size (`int`, *optional*, defaults to `self.image_size`):
        Side of the square the model takes (the model config's `image_size`); `size` is transformers' name for it.
    crop_pct (`float`, *optional*, defaults to `self.crop_pct`):
        The resize makes the shorter side `int(image_size / crop_pct)` before the centre crop to `image_size`.
    num_channels (`int`, *optional*, defaults to `self.num_channels`):
        Channels the model takes (the config's `num_channels`); only a 3-channel model converts images to RGB.
    patch_size (`int`), mask_patch_size (`int`), mask_ratio (`float`), mask_strategy (`str`):
        The masks of `return_bool_masked_pos` (the model config's values).
    return_bool_masked_pos (`bool`, *optional*, defaults to `False`):
        Also return `bool_masked_pos`, a SimMIM mask per image.
    mask_seed (`int`, *optional*):
        Seed of this call's masks (reproducible masks); by default they come from torch's global RNG.
    masks (`list`, *optional*):
        The user's own masks, one per image and of its size (before any resize): PIL mask images (nonzero in any
        colour band = masked, alpha ignored) or `(H, W)` arrays / tensors of bools or 0/1 integers (True / 1 =
        masked). Returned as `bool_masked_pos`: box-resized and centre-cropped as their image, a patch masked when
        at least half of it is. Not with `return_bool_masked_pos` or `mask_seed`, which draw masks.
    """

    image_size: int
    crop_pct: float | int
    num_channels: int
    patch_size: int
    mask_patch_size: int
    mask_ratio: float
    mask_strategy: str
    return_bool_masked_pos: bool
    mask_seed: int | None
    masks: ImageInput | None


class SimMIMImageProcessor(PilBackend):
    """Inference preprocessing of a SimMIM checkpoint: RGB (a 3-channel model, `do_convert_rgb`), resize the
    shorter side to `image_size / crop_pct`, centre crop `image_size`, rescale by `rescale_factor`, normalise with
    `image_mean` / `image_std`; and on request a SimMIM mask per image: drawn (`return_bool_masked_pos=True`), or
    the user's own (`masks=`, one per image of its size, e.g. to score or fill regions of their choosing), both
    returned as `bool_masked_pos`.

    A model with another `num_channels` needs `image_mean` and `image_std` of that many values (ImageNet's are
    RGB's), and its images keep their own precision (a 16-bit PIL image or array is not squeezed to 8 bits): they
    are rescaled by `rescale_factor`, which run_mim.py saves from its training images (1/255 for 8-bit pixels,
    1/65535 for 16-bit ones, 1 for floats), with the per-channel mean and std of those images (`hf-simmim stats`).
    Every attribute is also a per-call keyword (`size` for `image_size`); an unknown keyword is refused.

    Training augmentation is not held here: it is a named preset of `hf_simmim.data.augmentation`, derived from the
    model config by each run and recorded in its model card.
    """

    valid_kwargs = SimMIMImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = Image.Resampling.BICUBIC  # as timm and the official evaluation
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    image_size = 224
    crop_pct = 1.0
    num_channels = 3
    patch_size = 16
    mask_patch_size = 32
    mask_ratio = 0.6
    mask_strategy = "random_block"
    do_convert_rgb = True
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    # Training settings that processors of hf_simmim 0.1 saved; they are read and dropped (see the class docstring).
    LEGACY_TRAINING_KEYS = ("crop_scale", "crop_ratio", "hflip_prob", "train_resample", "rand_augment", "random_erasing")

    def __init__(self, **kwargs):
        for key in self.LEGACY_TRAINING_KEYS:
            kwargs.pop(key, None)
        if kwargs.get("masks") is not None:
            raise ValueError("masks are given per call, one per image (processor(images, masks=...)), not to __init__.")
        if kwargs.get("size") is not None:
            kwargs["image_size"] = square_side(kwargs.pop("size"))
        num_channels = kwargs.get("num_channels") or self.num_channels
        missing = [key for key in ("image_mean", "image_std") if kwargs.get(key) is None]
        if num_channels != 3 and missing:
            raise ValueError(
                f"num_channels={num_channels} needs image_mean and image_std of {num_channels} values (the defaults "
                f"are ImageNet's RGB statistics): pass {' and '.join(missing)}."
            )
        super().__init__(**kwargs)
        self.resample = resampling_filter("resample", self.resample)
        check_crop_pct(self.crop_pct)
        for key in ("image_mean", "image_std"):
            if np.size(getattr(self, key)) not in (1, num_channels):
                raise ValueError(
                    f"{key}={getattr(self, key)} has {np.size(getattr(self, key))} values for num_channels="
                    f"{num_channels}: give one value per channel."
                )

    @classmethod
    def from_model_config(cls, config, **kwargs):
        """The processor that matches a `SimMIMConfig` (image size, channels, patch and mask settings)."""
        geometry = ("image_size", "num_channels", "patch_size", "mask_patch_size", "mask_ratio", "mask_strategy")
        return cls(**{**{key: getattr(config, key) for key in geometry}, **kwargs})

    @classmethod
    def from_checkpoint(cls, checkpoint, config, **hub_kwargs):
        """The processor saved with `checkpoint` (a folder or hub id), or, for a checkpoint saved without one, the
        processor of its `config`."""
        try:
            return cls.from_pretrained(checkpoint, **hub_kwargs)
        except OSError:
            return cls.from_model_config(config)

    @property
    def converts_to_rgb(self):
        """Whether images become 8-bit RGB (a 3-channel model with `do_convert_rgb`), or keep their own channels at
        their precision, rescaled by `rescale_factor`."""
        return bool(self.do_convert_rgb) and self.num_channels == 3

    def mask_generator(self, seed=None):
        return mask_generator_for(self, seed=seed)

    def preprocess(self, images, **kwargs):
        """Images -> `BatchFeature` with `pixel_values` (and `bool_masked_pos`): NumPy arrays, one per image, unless
        `return_tensors` is "pt" or "np" (stacked). Keywords: the attributes, and transformers' `size`,
        `return_tensors`, `data_format`, `input_data_format`, `do_pad`, `pad_size`."""
        unknown = sorted(set(kwargs) - set(self.valid_kwargs.__annotations__))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} got unknown keyword argument(s) {', '.join(unknown)}: it takes "
                f"{', '.join(sorted(self.valid_kwargs.__annotations__))}."
            )
        return super().preprocess(images, **kwargs)

    def _validate_preprocess_kwargs(
        self, do_rescale=None, rescale_factor=None, do_normalize=None, image_mean=None, image_std=None,
        crop_pct=None, crop_size=None, resample=None, **kwargs,
    ):
        # transformers' own checks would ask for a crop_size: SimMIM crops a square of side size (image_size)
        if do_rescale and rescale_factor is None:
            raise ValueError("do_rescale=True needs a rescale_factor (1 / 255 for 8-bit images).")
        if do_normalize and (image_mean is None or image_std is None):
            raise ValueError("do_normalize=True needs image_mean and image_std.")
        if crop_size is not None:
            raise ValueError(
                "crop_size is not used: SimMIMImageProcessor crops a square of side size (image_size) after "
                "resizing the shorter side to size / crop_pct; pass size and crop_pct instead."
            )
        check_crop_pct(crop_pct)
        resampling_filter("resample", resample)
        check_masks_alone(kwargs.get("masks"), kwargs.get("return_bool_masked_pos"), kwargs.get("mask_seed"))

    def _prepare_images_structure(self, images, expected_ndims=3):
        # transformers takes no HW (grey) arrays or tensors; with a channel axis (1HW) they are images like others
        def with_channel_axis(image):
            return image[None] if getattr(image, "ndim", None) == 2 else image

        if isinstance(images, (list, tuple)):
            images = [with_channel_axis(image) for image in images]
        return super()._prepare_images_structure(with_channel_axis(images), expected_ndims)

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, num_channels=None, **kwargs):
        """One PIL, NumPy or torch image -> CHW NumPy array; converted to RGB when `do_convert_rgb` and the model
        takes 3 channels (any PIL mode, grey and grey + alpha, RGBA composited on white)."""
        convert = bool(do_convert_rgb) and num_channels == 3
        if isinstance(image, Image.Image):
            array = np.asarray(to_rgb(image) if convert else image)
            return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if not isinstance(image, np.ndarray):  # a torch tensor (`fetch_images` let only valid images through)
            image = image.detach().cpu().numpy()
        array = channels_first(image, input_data_format, num_channels)
        return to_rgb_array(array) if convert else array

    def _preprocess(
        self, images, size=None, image_size=None, do_pad=None, pad_size=None, data_format=None, return_tensors=None,
        return_bool_masked_pos=None, mask_seed=None, patch_size=None, mask_patch_size=None, mask_ratio=None,
        mask_strategy=None, masks=None, **kwargs,
    ):
        if not images:
            raise ValueError("images is empty: pass at least one image.")
        side = image_size if size is None else square_side(size)
        pixel_masks = None if masks is None else self.user_masks(masks, images, side, do_pad, **kwargs)
        if kwargs["do_rescale"] and any(is_scaled_image(image) for image in images):
            logger.warning_once(
                "It looks like you are trying to rescale already rescaled images (values in [0, 1]): pass "
                "do_rescale=False for images that are already floats in [0, 1]."
            )
        pixel_values = [self.resize_crop_normalize(image, side, **kwargs) for image in images]
        if do_pad:
            pixel_values = self.pad(pixel_values, pad_size=pad_size)
        data = {"pixel_values": pixel_values}
        if return_bool_masked_pos:
            if {image.shape[-2:] for image in pixel_values} != {(side, side)}:
                raise ValueError(
                    f"return_bool_masked_pos=True draws masks for {side} x {side} images: keep do_resize and "
                    "do_center_crop on (or do_center_crop alone), without padding."
                )
            fields = dict(
                image_size=side, mask_patch_size=mask_patch_size, patch_size=patch_size, mask_ratio=mask_ratio,
                mask_strategy=mask_strategy,
            )
            generator = mask_generator_for(fields, seed=mask_seed)
            data["bool_masked_pos"] = [generator() for _ in pixel_values]
        if pixel_masks is not None:
            data["bool_masked_pos"] = [
                evaluation_patch_mask(mask, side, patch_size, kwargs["crop_pct"], resize=kwargs["do_resize"])
                for mask in pixel_masks
            ]
        if data_format is not None and ChannelDimension(data_format) == ChannelDimension.LAST:
            data["pixel_values"] = [np.moveaxis(image, 0, -1) for image in pixel_values]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def user_masks(self, masks, images, side, do_pad, do_resize, crop_pct, do_center_crop, **kwargs):
        """`masks=` checked against `images` (CHW arrays, not yet resized) -> one bool `(H, W)` mask per image.
        Their patches line up with the model's only when every image becomes a `side` square without padding."""
        masks = mask_list(masks)
        if len(masks) != len(images):
            raise ValueError(
                f"masks holds {len(masks)} mask(s) for {len(images)} image(s): give one mask per image, in the "
                "images' order (a 3-D array or tensor is a stack of (H, W) masks: for an (H, W, 1) mask pass "
                "mask[..., 0])."
            )
        arrays = [bool_mask(mask, f"masks[{index}]") for index, mask in enumerate(masks)]
        for index, (mask, image) in enumerate(zip(arrays, images)):
            (height, width), (image_height, image_width) = mask.shape, image.shape[-2:]
            if (height, width) != (image_height, image_width):
                raise ValueError(
                    f"masks[{index}] is {width}x{height} px but images[{index}] is {image_width}x{image_height} px "
                    "(width x height): give each mask its image's size, before any resize."
                )
            size = processed_size(height, width, side, do_resize, crop_pct, do_center_crop)
            if do_pad or size != (side, side):
                raise ValueError(
                    f"masks= needs every image processed to a {side} x {side} square (the model's patch grid), but "
                    f"images[{index}] becomes {size[1]} x {size[0]}{' and is padded' if do_pad else ''}: keep "
                    "do_resize and do_center_crop on (or do_center_crop alone), without padding."
                )
        return arrays

    def resize_crop_normalize(
        self, image, side, do_resize, crop_pct, resample, do_center_crop, do_rescale, rescale_factor, do_normalize,
        image_mean, image_std, **kwargs,
    ):
        """One CHW array -> resized (shorter side `int(side / crop_pct)`), centre-cropped (`side`), rescaled and
        normalised, each step as its flag says; uint8 stays uint8 when neither rescaled nor normalised."""

        def resize_and_crop(channel):
            if do_resize:
                channel = resize_shorter_side(channel, int(side / crop_pct), resample)
            return center_crop(channel, side) if do_center_crop else channel

        if do_resize or do_center_crop:
            image = map_channels(image, resize_and_crop)
        if do_rescale or do_normalize:
            mean, std = (image_mean, image_std) if do_normalize else (None, None)
            image = rescale_and_normalize(image, rescale_factor if do_rescale else None, mean, std)
        return image
