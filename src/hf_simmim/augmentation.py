"""The extra augmentation of the official SimMIM fine-tuning, without torchvision: RandAugment as timm's
`rand-m9-mstd0.5-inc1` policy (on PIL images) and random erasing with per-pixel noise (on normalised CHW arrays).

RandAugment (Cubuk et al., 2020), as timm implements it and the official fine-tuning configures it: `n` ops (2)
drawn uniformly with replacement from the "increasing" op set; each is applied with probability 0.5 at a
magnitude drawn per op from N(m, mstd) clipped to [0, 10]; signed ops (rotate, shear, translate, enhance) flip
their sign with probability 0.5; geometric ops fill with the ImageNet mean colour. Random erasing (Zhong et al.,
2020): with probability `p`, one rectangle of 2-33 % of the area and aspect ratio in [0.3, 3.3] is replaced by
standard normal noise (the image is already normalised).
"""

import math
import random
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0
FILL = (124, 116, 104)  # the ImageNet mean colour, in 0-255


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


def _affine(image, matrix, rng):
    return image.transform(image.size, Image.AFFINE, matrix, resample=rng.choice((Image.BILINEAR, Image.BICUBIC)),
                           fillcolor=FILL)


def _rotate(image, m, rng):
    return image.rotate(_signed(m / MAX_MAGNITUDE * 30.0, rng), resample=rng.choice((Image.BILINEAR, Image.BICUBIC)),
                        fillcolor=FILL)


def _shear_x(image, m, rng):
    return _affine(image, (1, _signed(m / MAX_MAGNITUDE * 0.3, rng), 0, 0, 1, 0), rng)


def _shear_y(image, m, rng):
    return _affine(image, (1, 0, 0, _signed(m / MAX_MAGNITUDE * 0.3, rng), 1, 0), rng)


def _translate_x(image, m, rng):
    return _affine(image, (1, 0, _signed(m / MAX_MAGNITUDE * 0.45, rng) * image.width, 0, 1, 0), rng)


def _translate_y(image, m, rng):
    return _affine(image, (1, 0, 0, 0, 1, _signed(m / MAX_MAGNITUDE * 0.45, rng) * image.height), rng)


def _enhancer(kind):
    def apply(image, m, rng):
        return kind(image).enhance(1.0 + _signed(m / MAX_MAGNITUDE * 0.9, rng))

    return apply


def _posterize(image, m, rng):
    return ImageOps.posterize(image, max(0, 4 - int(m / MAX_MAGNITUDE * 4)))


def _solarize(image, m, rng):
    return ImageOps.solarize(image, 256 - int(m / MAX_MAGNITUDE * 256))


def _solarize_add(image, m, rng, threshold=128):
    add = int(m / MAX_MAGNITUDE * 110)
    table = [min(255, v + add) if v < threshold else v for v in range(256)]
    return image.point(table * len(image.getbands()))


OPS = {
    "AutoContrast": lambda image, m, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, m, rng: ImageOps.equalize(image),
    "Invert": lambda image, m, rng: ImageOps.invert(image),
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
    """`RandAugment("rand-m9-mstd0.5-inc1")(image, rng)`: an RGB PIL image in, an RGB PIL image out."""

    def __init__(self, spec="rand-m9-mstd0.5-inc1"):
        self.spec = spec
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
            image = OPS[name](image, self.draw_magnitude(rng), rng)
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
        if 0 < w < width and 0 < h < height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            noise = np.random.default_rng(rng.getrandbits(63)).standard_normal((array.shape[0], h, w))
            array[:, top : top + h, left : left + w] = noise.astype(array.dtype)
            break
    return array
