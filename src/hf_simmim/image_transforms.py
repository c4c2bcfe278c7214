"""Image operations on PIL images and numpy arrays, without torchvision: RGB conversion of any PIL mode, the
paper's RandomResizedCrop and flip, resize + centre crop, and normalisation to a CHW float array."""

import math
import random

import numpy as np
from PIL import Image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def to_rgb(image):
    """Any PIL image (grayscale, 16-bit, float, palette, RGBA, CMYK, ...) or HWC array -> 8-bit RGB PIL image."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def random_resized_crop_box(width, height, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), rng=random):
    """The crop box `(left, top, right, bottom)` of torchvision's RandomResizedCrop.get_params: 10 tries at a
    random area fraction and log-uniform aspect ratio, then a centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def random_resized_crop(image, size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), rng=random):
    box = random_resized_crop_box(image.width, image.height, scale, ratio, rng)
    return image.resize((size, size), Image.BICUBIC, box=box)


def random_horizontal_flip(image, p=0.5, rng=random):
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else image


def resize_center_crop(image, size, crop_pct=1.0):
    """Resize the shorter side to `size / crop_pct`, then take the central `size` x `size` square."""
    short = int(math.floor(size / crop_pct))
    w, h = image.size
    if w <= h:
        new_w, new_h = short, max(short, int(round(h * short / w)))
    else:
        new_w, new_h = max(short, int(round(w * short / h))), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_normalized_array(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """RGB PIL image -> float32 CHW array, scaled to [0, 1] then normalised with `mean`/`std`."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))
