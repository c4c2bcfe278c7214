"""Training augmentation as named presets, without torchvision.

An `AugmentationPreset` says what a training run does to an image before the mask: the crop, the flip, and for
fine-tuning RandAugment and random erasing. It takes RGB photos (PIL images) and images that keep their own
channels (CHW arrays of any channel count and pixel type, `data.pixels`), which get the same crop and flip, each
channel resized at its precision; RandAugment, defined on 8-bit RGB images, is refused for the latter. A user mask
goes through the crop and flip of its image. Two presets reproduce the official code, each derived from the
model's image size: `pretraining_augmentation` (microsoft/SimMIM `SimMIMTransform`: RandomResizedCrop scale
0.67-1, bilinear, flip) and `finetuning_augmentation` (timm's `create_transform` as the official fine-tuning
calls it: RandomResizedCrop 0.08-1 bicubic, flip, RandAugment, random erasing 0.25; for a model of 32 px or
less timm's RandomCrop(32, padding=4) instead of the resized crop).

timm's padded crop assumes images already at the model's size (CIFAR's 32 px): on a larger image it would train
on a raw 32-px window while evaluation sees the whole image resized. So an image of another size is first brought
to the model's size as evaluation does (shorter side to the size with the preset's filter, bicubic for fine-tuning
as for evaluation, then the centre square), and the padded crop is taken from that: 32-px images are cropped
exactly as timm does, and any other image trains on what it is evaluated on.

RandAugment (Cubuk et al., 2020), as timm implements it and the official fine-tuning configures it: `n` ops (2)
drawn uniformly with replacement from the "increasing" op set; each is applied with probability 0.5 at a
magnitude drawn per op from N(m, mstd) clipped to [0, 10]; signed ops (rotate, shear, translate, enhance) flip
their sign with probability 0.5; geometric ops resample with the preset's filter (bicubic for fine-tuning, as timm's
`interpolation` hparam) and fill with the ImageNet mean colour. Translations are relative (timm's TranslateXRel /
TranslateYRel: up to 0.45 of the image side); timm's `translate_const` only serves its absolute TranslateX/Y, which
the increasing op set does not hold. Random erasing (Zhong et al.,
2020): with probability `p`, one rectangle of 2-33 % of the area and aspect ratio in [0.3, 3.3] is replaced by
standard normal noise (the image is already normalised).
"""

import math
import random
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..models.image_transforms import map_channels, resize_center_crop, to_rgb
from .image_ops import (
    flip_pixels,
    load_pixels,
    padded_crop,
    padded_crop_pixels,
    random_resized_crop_box,
    resized_crop,
    resized_crop_pixels,
)
from .user_masks import check_mask_size

MAX_MAGNITUDE = 10.0
FILL = (124, 116, 104)  # the ImageNet mean colour, in 0-255


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


# The ops of `OPS` below: (PIL image, magnitude in [0, 10], rng, PIL filter of the geometric ops) -> PIL image.
def _affine(image, matrix, resample):
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=FILL)


def _rotate(image, m, rng, resample):
    return image.rotate(_signed(m / MAX_MAGNITUDE * 30.0, rng), resample=resample, fillcolor=FILL)


def _shear_x(image, m, rng, resample):
    return _affine(image, (1, _signed(m / MAX_MAGNITUDE * 0.3, rng), 0, 0, 1, 0), resample)


def _shear_y(image, m, rng, resample):
    return _affine(image, (1, 0, 0, _signed(m / MAX_MAGNITUDE * 0.3, rng), 1, 0), resample)


def _translate_x(image, m, rng, resample):
    return _affine(image, (1, 0, _signed(m / MAX_MAGNITUDE * 0.45, rng) * image.width, 0, 1, 0), resample)


def _translate_y(image, m, rng, resample):
    return _affine(image, (1, 0, 0, 0, 1, _signed(m / MAX_MAGNITUDE * 0.45, rng) * image.height), resample)


def _enhancer(kind):
    def apply(image, m, rng, resample):
        return kind(image).enhance(1.0 + _signed(m / MAX_MAGNITUDE * 0.9, rng))

    return apply


def _posterize(image, m, rng, resample):
    """Keep the 4 - int(m / 10 * 4) high bits of each channel, by `ImageOps.posterize`'s rule
    `v & ~(2 ** (8 - bits) - 1)`. At magnitude 10 that is 0 bits: a black image, which is what timm got from Pillow
    before Pillow began refusing `bits=0` (a draw of m >= 10 happens about once in 44 with m9-mstd0.5)."""
    bits = 4 - int(m / MAX_MAGNITUDE * 4)
    table = [v & ~(2 ** (8 - bits) - 1) for v in range(256)]
    return image.point(table * len(image.getbands()))


def _solarize(image, m, rng, resample):
    return ImageOps.solarize(image, 256 - int(m / MAX_MAGNITUDE * 256))


def _solarize_add(image, m, rng, resample, threshold=128):
    add = int(m / MAX_MAGNITUDE * 110)
    table = [min(255, v + add) if v < threshold else v for v in range(256)]
    return image.point(table * len(image.getbands()))


OPS = {
    "AutoContrast": lambda image, m, rng, resample: ImageOps.autocontrast(image),
    "Equalize": lambda image, m, rng, resample: ImageOps.equalize(image),
    "Invert": lambda image, m, rng, resample: ImageOps.invert(image),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhancer(ImageEnhance.Color),
    "ContrastIncreasing": _enhancer(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhancer(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def parse_rand_augment(spec):
    """`"rand-m9-mstd0.5-inc1"` (timm's notation: magnitude, its std, number of ops `n`, op probability `p`) ->
    `{"magnitude": 9.0, "magnitude_std": 0.5, "num_ops": 2, "prob": 0.5}`. Only the increasing op set exists here,
    so `inc1` is accepted and `inc0` refused."""
    parts = str(spec).split("-")
    if parts[0] != "rand":
        raise ValueError(f"rand_augment={spec!r} must start with 'rand-', e.g. 'rand-m9-mstd0.5-inc1' (official).")
    settings = {"magnitude": 10.0, "magnitude_std": 0.0, "num_ops": 2, "prob": 0.5}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d+)?|inf)", part)
        if not match:
            raise ValueError(f"rand_augment={spec!r}: cannot read {part!r} (use m<magnitude>, mstd<std>, n<ops>, p<prob>, inc1).")
        key, value = match.groups()
        if key == "inc":
            if value != "1":
                raise ValueError(f"rand_augment={spec!r}: only the increasing op set (inc1) is implemented.")
        elif key == "m":
            settings["magnitude"] = float(value)
        elif key == "mstd":
            settings["magnitude_std"] = float(value)
        elif key == "n":
            settings["num_ops"] = int(float(value))
        else:
            settings["prob"] = float(value)
    if not 0.0 <= settings["prob"] <= 1.0 or settings["num_ops"] < 0:
        raise ValueError(f"rand_augment={spec!r}: p must lie in [0, 1] and n be >= 0.")
    return settings


class RandAugment:
    """`RandAugment("rand-m9-mstd0.5-inc1")(image, rng)`: an RGB PIL image in, an RGB PIL image out. `resample`:
    the PIL filter of the geometric ops (timm takes it from the run's interpolation: bicubic when fine-tuning)."""

    def __init__(self, spec="rand-m9-mstd0.5-inc1", resample=Image.BICUBIC):
        self.spec = spec
        self.resample = resample
        settings = parse_rand_augment(spec)
        self.magnitude, self.magnitude_std = settings["magnitude"], settings["magnitude_std"]
        self.num_ops, self.prob = settings["num_ops"], settings["prob"]
        self.names = list(OPS)

    def draw_magnitude(self, rng):
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.gauss(m, self.magnitude_std)
        return min(MAX_MAGNITUDE, max(0.0, m))

    def __call__(self, image, rng=random):
        for _ in range(self.num_ops):
            name = self.names[rng.randrange(len(self.names))]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            image = OPS[name](image, self.draw_magnitude(rng), rng, self.resample)
        return image


def random_erasing(array, prob=0.25, rng=random, min_area=0.02, max_area=1.0 / 3.0, min_aspect=0.3):
    """With probability `prob`, replace one random rectangle of a normalised CHW float array by standard normal
    noise (timm's RandomErasing, mode 'pixel', one box). Returns the array (changed in place)."""
    if prob <= 0.0 or rng.random() >= prob:
        return array
    _, height, width = array.shape
    area = height * width
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * area
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < width and h < height:  # timm's test (a 0-px side erases nothing)
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            noise = np.random.default_rng(rng.getrandbits(63)).standard_normal((array.shape[0], h, w))
            array[:, top : top + h, left : left + w] = noise.astype(array.dtype)
            break
    return array


CROPS = ("random_resized", "random_padded")
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
OFFICIAL_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# timm's `transforms_imagenet_train` rule, which the official fine-tuning keeps: at 32 px or less, RandomCrop with
# 4 px of zero padding replaces the RandomResizedCrop.
SMALL_IMAGE_SIZE = 32


@dataclass(frozen=True)
class AugmentationPreset:
    """A training augmentation: `crop` ("random_resized": area `crop_scale`, aspect `crop_ratio`, `resample`;
    "random_padded": the image at the model's size (`resample`, as evaluation: shorter side to `image_size`, centre
    crop; a no-op at that size), `crop_padding` px of black border, then a random window), a horizontal flip with
    `hflip_prob`, then `rand_augment` (timm's notation, or None) on the PIL image and `random_erasing` (a
    probability) on the normalised array."""

    name: str
    image_size: int
    crop: str = "random_resized"
    crop_scale: tuple = (0.67, 1.0)
    crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    crop_padding: int = 0
    resample: str = "bilinear"
    hflip_prob: float = 0.5
    rand_augment: str | None = None
    random_erasing: float = 0.0

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r} is not supported: use one of {CROPS}.")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample={self.resample!r} is not supported: use one of {tuple(RESAMPLE)}.")
        if self.rand_augment is not None:
            parse_rand_augment(self.rand_augment)  # a malformed policy fails now, not in a DataLoader worker
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"random_erasing={self.random_erasing} is a probability: give a value in [0, 1].")

    def to_dict(self):
        return asdict(self)

    def describe(self):
        """One line for logs and model cards, e.g. "RandomCrop(32, padding=4), horizontal flip 0.5, ..."."""
        if self.crop == "random_resized":
            scale, ratio = tuple(self.crop_scale), tuple(round(r, 3) for r in self.crop_ratio)
            crop = f"RandomResizedCrop({self.image_size}, scale={scale}, ratio={ratio}, {self.resample})"
        else:
            crop = f"RandomCrop({self.image_size}, padding={self.crop_padding})"
        parts = [crop, f"horizontal flip {self.hflip_prob}"]
        parts += [f"RandAugment {self.rand_augment}"] * bool(self.rand_augment)
        parts += [f"random erasing {self.random_erasing}"] * bool(self.random_erasing)
        return f"{self.name}: " + ", ".join(parts)

    def check_input(self, rgb=True, with_mask=False):
        """Refuse what the preset cannot do before any image is read: RandAugment (defined on 8-bit RGB images:
        colour ops such as Solarize, Equalize or Color have no meaning for other channels) on images that are not
        RGB, or with a user mask (its geometric ops would move the image away from the mask)."""
        if self.rand_augment and not rgb:
            raise ValueError(
                f"RandAugment ({self.rand_augment}) is defined on 8-bit RGB images; this model takes images that "
                "are not converted to RGB. Pass --rand_augment none (crop, flip, mixup/cutmix and random erasing "
                "work on any channels)."
            )
        if self.rand_augment and with_mask:
            raise ValueError(
                f"RandAugment ({self.rand_augment}) would move the image away from its user mask: build the preset "
                "with rand_augment=None to train on user masks."
            )

    def draw_geometry(self, width, height, rng=random):
        """The random crop and flip of a `width` x `height` image, `(crop, flip)`: `crop` is the resized crop's
        box, or the padded crop's window `(top, left)` in the padded view at the model's size. Drawn in the
        order the crop and the flip have always drawn them, so an image is augmented alike with and without a
        mask, and as before masks existed."""
        if self.crop == "random_resized":
            crop = random_resized_crop_box(width, height, self.crop_scale, self.crop_ratio, rng)
        else:
            span = 2 * self.crop_padding
            crop = (rng.randint(0, span), rng.randint(0, span))
        return crop, rng.random() < self.hflip_prob

    def crop_image(self, image, crop):
        """The crop of `draw_geometry` of a PIL image (decoded here; converted to RGB)."""
        if self.crop == "random_resized":
            return resized_crop(image, crop, self.image_size, RESAMPLE[self.resample])
        at_model_size = resize_center_crop(to_rgb(load_pixels(image)), self.image_size, 1.0, RESAMPLE[self.resample])
        return padded_crop(at_model_size, self.image_size, self.crop_padding, *crop)

    def crop_pixels(self, pixels, crop, resample=None):
        """The crop of `draw_geometry` of a CHW array (any channel count and pixel type), with `resample` (default:
        the preset's)."""
        resample = RESAMPLE[self.resample] if resample is None else resample
        if self.crop == "random_resized":
            return resized_crop_pixels(pixels, crop, self.image_size, resample)
        at_model_size = map_channels(pixels, lambda c: resize_center_crop(c, self.image_size, 1.0, resample))
        return padded_crop_pixels(at_model_size, self.image_size, self.crop_padding, *crop)

    def augment(self, image, rng=random, mask=None):
        """A PIL image -> RGB PIL image, or a CHW array (any channel count) -> CHW array at its precision (float32;
        uint8 stays uint8). An image only opened (`image_ops.open_image`) is decoded by the crop (a JPEG at reduced
        scale when the crop allows it); if it cannot be decoded, `UndecodableImage` is raised.

        With `mask` (an HW float array of the image's size, 1 = masked) -> `(image, mask)`: the mask goes through
        the same crop and flip, resized with PIL's box filter, so each of its pixels at the model's size holds the
        masked share of the source area it covers."""
        is_array = isinstance(image, np.ndarray)
        self.check_input(rgb=not is_array, with_mask=mask is not None)
        width, height = (image.shape[2], image.shape[1]) if is_array else image.size
        check_mask_size(mask, width, height)
        crop, flip = self.draw_geometry(width, height, rng)
        image = self.crop_pixels(image, crop) if is_array else self.crop_image(image, crop)
        if flip:
            image = flip_pixels(image) if is_array else image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment_policy is not None:
            image = self.rand_augment_policy(image, rng)
        if mask is None:
            return image
        mask = self.crop_pixels(mask[None].astype(np.float32), crop, Image.BOX)[0]
        return image, (flip_pixels(mask) if flip else mask)

    @property
    def rand_augment_policy(self):
        """The `RandAugment` of `rand_augment` (None without), its geometric ops resampling with `resample`."""
        if not self.rand_augment:
            return None
        key = (self.rand_augment, RESAMPLE[self.resample])
        if key not in _POLICIES:
            _POLICIES[key] = RandAugment(*key)
        return _POLICIES[key]


_POLICIES = {}  # RandAugment objects by (spec, resample): built once per process, not per image


def pretraining_augmentation(image_size):
    """The official SimMIM pretraining augmentation at `image_size` (microsoft/SimMIM `data/data_simmim.py`)."""
    return AugmentationPreset("simmim-pretraining", image_size, crop_scale=(0.67, 1.0), resample="bilinear")


def finetuning_augmentation(image_size, rand_augment=OFFICIAL_RAND_AUGMENT, random_erasing=0.25):
    """The official SimMIM fine-tuning augmentation at `image_size` (timm's `create_transform` with the official
    config: `data/data_finetune.py`)."""
    if image_size <= SMALL_IMAGE_SIZE:
        crop = dict(crop="random_padded", crop_padding=4)
    else:
        crop = dict(crop="random_resized", crop_scale=(0.08, 1.0))
    return AugmentationPreset(
        "simmim-finetuning",
        image_size,
        resample="bicubic",
        rand_augment=rand_augment,
        random_erasing=random_erasing,
        **crop,
    )
