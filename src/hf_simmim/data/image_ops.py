"""Training image operations, without torchvision: decoding a dataset cell, the paper's RandomResizedCrop and flip,
uint8 CHW arrays and their normalisation on the batch.

Speed matters here (a DataLoader worker runs these for every image of every epoch): a JPEG not yet decoded is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg when the crop still keeps at least the output size in pixels
(`reduce_on_decode`), and batches travel as uint8, normalised where they are used (`normalize_pixel_batch`).
"""

import io
import math
import random

import numpy as np
import torch
from PIL import Image

from ..models.image_transforms import normalization_coefficients, to_rgb


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


def random_padded_crop(image, size, padding, rng=random):
    """torchvision's RandomCrop(size, padding): `padding` px of black border on every side, then a uniformly
    placed `size` x `size` window (timm's crop for images of 32 px or less)."""
    image = to_rgb(image)
    if padding:
        padded = Image.new("RGB", (image.width + 2 * padding, image.height + 2 * padding))
        padded.paste(image, (padding, padding))
        image = padded
    if image.width < size or image.height < size:
        raise ValueError(f"a {image.width}x{image.height} image (padding included) cannot give a {size} px crop")
    top, left = rng.randint(0, image.height - size), rng.randint(0, image.width - size)
    return image.crop((left, top, left + size, top + size))


def random_horizontal_flip(image, p=0.5, rng=random):
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < p else image


def to_uint8_array(image):
    """RGB PIL image -> uint8 CHW array (normalised later, on the batch: `data.normalize_pixel_batch`)."""
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def decode_image(value, lazy=False):
    """A dataset cell -> PIL image: a PIL image, `{"bytes": ..., "path": ...}` (an undecoded `datasets.Image`),
    raw bytes, or a file path. Decoded at once (a truncated file fails here), unless `lazy`: then only the header
    is read, so the training crop can have a JPEG decoded at reduced scale (`reduce_on_decode`)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image cell holds neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        return Image.fromarray(value)
    else:
        raise TypeError(f"cannot read an image from {type(value).__name__}")
    if not lazy:
        image.load()  # decode now, so a truncated file fails here and not later
    return image


def normalize_pixel_batch(pixel_values, image_mean, image_std):
    """A uint8 `(B, 3, H, W)` batch (from `SimMIMTransform(uint8=True)`) -> float32 `(x / 255 - mean) / std`, on
    the batch's device, computed as `to_normalized_array` does (`x * a + b`); a float batch is returned as is."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    a, b = normalization_coefficients(image_mean, image_std)
    a = torch.as_tensor(a, device=pixel_values.device).view(1, -1, 1, 1)
    b = torch.as_tensor(b, device=pixel_values.device).view(1, -1, 1, 1)
    return pixel_values.float().mul_(a).add_(b)

