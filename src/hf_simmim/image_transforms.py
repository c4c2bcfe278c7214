"""Image operations on PIL images and numpy arrays, without torchvision: RGB conversion of any PIL mode, the
paper's RandomResizedCrop and flip, resize + centre crop, and normalisation to a CHW float array.

Speed matters here (a DataLoader worker runs these for every image of every epoch): a JPEG not yet decoded is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg when the crop still keeps at least the output size in pixels
(`reduce_on_decode`), and normalisation is one fused multiply-add on the uint8 pixels."""

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


def reduce_on_decode(image, box, size):
    """Let libjpeg decode a JPEG that is not decoded yet at 1/2, 1/4 or 1/8 scale (DCT scaling, much faster than
    decoding in full and then shrinking) as long as `box`, the region that will be resized to `size` x `size`,
    keeps at least `size` pixels on each side. Returns `(image, box)` with the box in the reduced image's pixels;
    other images (and JPEGs already decoded) come back unchanged."""
    left, top, right, bottom = box
    shorter = min(right - left, bottom - top)
    if getattr(image, "format", None) != "JPEG" or shorter < 2 * size:
        return image, box
    width, height = image.size
    factor = shorter / size  # the most the crop may shrink
    reduced = image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    if reduced is None:  # already decoded, or not reducible
        return image, box
    scale_x, scale_y = reduced[1][2] / width, reduced[1][3] / height
    return image, (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)


def random_resized_crop(image, size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), rng=random, resample=Image.BILINEAR):
    """The paper's RandomResizedCrop of any PIL image (converted to RGB) to `size` x `size`. `resample` as
    torchvision's default, bilinear, which the official SimMIM pretraining uses (its fine-tuning uses bicubic)."""
    box = random_resized_crop_box(image.width, image.height, scale, ratio, rng)
    image, box = reduce_on_decode(image, box, size)
    return to_rgb(image).resize((size, size), resample, box=box)


def random_horizontal_flip(image, p=0.5, rng=random):
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else image


def resize_center_crop(image, size, crop_pct=1.0, resample=Image.BICUBIC):
    """Resize the shorter side to `size / crop_pct`, then take the central `size` x `size` square."""
    short = int(math.floor(size / crop_pct))
    w, h = image.size
    if w <= h:
        new_w, new_h = short, max(short, int(round(h * short / w)))
    else:
        new_w, new_h = max(short, int(round(w * short / h))), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_uint8_array(image):
    """RGB PIL image -> uint8 CHW array (normalised later, on the batch: `data.normalize_pixel_batch`)."""
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def normalization_coefficients(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """`(a, b)` float32, shape `(3,)`, with `(pixel / 255 - mean) / std == pixel * a + b`."""
    std = np.asarray(std, dtype=np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (-np.asarray(mean, dtype=np.float64) / std).astype(np.float32)


def to_normalized_array(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """RGB PIL image -> float32 CHW array `(pixel / 255 - mean) / std`, computed as one multiply-add on the uint8
    pixels (`pixel * a + b`, equal to the formula within float32 rounding)."""
    a, b = normalization_coefficients(mean, std)
    pixels = np.asarray(image).transpose(2, 0, 1)
    out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, a[:, None, None], out=out, casting="unsafe")
    out += b[:, None, None]
    return out
