"""Inference image operations, without torchvision: RGB conversion of any PIL mode or channel-first array,
resize + centre crop (of PIL images, or of arrays with any channel count, one channel at a time), and rescale +
normalisation to a CHW float array (one fused multiply-add). The image processor uses them; the training data path
(`hf_simmim.data`) builds on them.

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


def to_rgb_array(pixels):
    """CHW array of 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels -> 3-channel RGB CHW array, alpha
    composited on white as `to_rgb` does. uint8 goes through `to_rgb` itself (the same pixels as the PIL image);
    other dtypes are kept (an image with alpha must then be floats in [0, 1], white being 1.0)."""
    channels = pixels.shape[0]
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"Cannot convert a {channels}-channel image to RGB: pass do_convert_rgb=False, with image_mean and "
            f"image_std of {channels} values."
        )
    if pixels.dtype == np.uint8:
        channels_last = pixels[0] if channels == 1 else np.moveaxis(pixels, 0, -1)
        return np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(channels_last)))).transpose(2, 0, 1)
    if channels in (2, 4):
        if not np.issubdtype(pixels.dtype, np.floating) or pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ValueError(
                f"An image with alpha is composited on white as uint8, or as floats in [0, 1]; got {pixels.dtype} "
                f"values in [{pixels.min()}, {pixels.max()}]: convert it, or pass do_convert_rgb=False."
            )
        pixels = pixels[:-1] * pixels[-1:] + (1.0 - pixels[-1:])
    return np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels


def shorter_side_size(width, height, size):
    """`(width, height)` after torchvision's `Resize(size)`: the shorter side becomes `size` and the longer one
    `int(size * long / short)` (truncated, as torchvision does)."""
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


def resize_shorter_side(image, size, resample=Image.BICUBIC):
    """torchvision's `Resize(size)` (`shorter_side_size`); an image already that size is not resampled."""
    new_size = shorter_side_size(*image.size, size)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image, size):
    """torchvision's `CenterCrop(size)`: the central `size` x `size` square, its offsets `int(round(margin / 2))`
    (Python's round, half to even, as torchvision); a smaller image is padded with zeros."""
    w, h = image.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def resize_center_crop(image, size, crop_pct=1.0, resample=Image.BICUBIC):
    """`Resize(int(size / crop_pct))` then `CenterCrop(size)`, as the official evaluation uses them."""
    return center_crop(resize_shorter_side(image, int(size / crop_pct), resample), size)


def map_channels(pixels, operation):
    """Apply a PIL image operation (resize, crop) to each channel of a CHW array, so any channel count works: uint8
    channels as 8-bit images (the same pixels as the operation on the RGB image), others as 32-bit float images
    (no rounding to 8 bits); returns a uint8 or float32 CHW array."""
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float32)
    return np.stack([np.asarray(operation(Image.fromarray(np.ascontiguousarray(channel)))) for channel in pixels])


def normalization_coefficients(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, rescale_factor=1 / 255):
    """`(a, b)` float32, one value per entry of `mean`/`std`, with `(pixel * rescale_factor - mean) / std ==
    pixel * a + b`."""
    std = np.atleast_1d(np.asarray(std, dtype=np.float64))
    mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    return (rescale_factor / std).astype(np.float32), (-mean / std).astype(np.float32)


def rescale_and_normalize(pixels, rescale_factor=1 / 255, mean=None, std=None):
    """CHW array -> float32 CHW `(pixels * rescale_factor - mean) / std`, computed as one multiply-add
    (`pixels * a + b`, equal to the formula within float32 rounding). `rescale_factor=None` leaves the scale;
    `mean=std=None` only rescales. `mean`/`std` hold one value per channel, or one for all channels."""
    channels = pixels.shape[0]
    scale = 1.0 if rescale_factor is None else rescale_factor
    if mean is None:
        a, b = np.full(1, scale, dtype=np.float32), np.zeros(1, dtype=np.float32)
    elif {np.size(mean), np.size(std)} <= {1, channels}:
        a, b = normalization_coefficients(mean, std, scale)
    else:
        raise ValueError(
            f"image_mean has {np.size(mean)} and image_std {np.size(std)} values, but the image has {channels} "
            f"channel(s): pass image_mean and image_std with {channels} values (or one for all channels)."
        )
    out = np.empty(pixels.shape, dtype=np.float32)
    np.multiply(pixels, a[:, None, None], out=out, casting="unsafe")
    out += b[:, None, None]
    return out


def to_normalized_array(image, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """RGB PIL image -> float32 CHW array `(pixel / 255 - mean) / std` (`rescale_and_normalize` of its pixels)."""
    return rescale_and_normalize(np.asarray(image).transpose(2, 0, 1), 1 / 255, mean, std)
