"""Inference image operations, without torchvision: RGB conversion of any PIL mode, resize + centre crop, and
normalisation to a CHW float array (one fused multiply-add on the uint8 pixels). The image processor uses them; the
training data path (`hf_simmim.data`) builds on them.

Relative imports only: a checkpoint saved with its code (`trust_remote_code`) carries this file.
"""

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


def resize_center_crop(image, size, crop_pct=1.0, resample=Image.BICUBIC):
    """torchvision's `Resize(int(size / crop_pct))` then `CenterCrop(size)`, as the official evaluation uses them:
    the shorter side becomes `int(size / crop_pct)` and the longer one `int(short * long / shorter)` (truncated, as
    torchvision does; an image already that size is not resampled), then the central `size` x `size` square, its
    offsets `int(round(margin / 2))` (Python's round, half to even, as torchvision)."""
    short = int(size / crop_pct)
    w, h = image.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


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
