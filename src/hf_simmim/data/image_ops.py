"""Training image operations, without torchvision: decoding a dataset cell, the paper's RandomResizedCrop and flip,
uint8 CHW arrays and their normalisation on the batch.

Decoding is the only step allowed to fail on bad data: PIL's opening and decoding raise `UndecodableImage`
(`decoding`), which the data path reports, counts and skips; any other error is a bug and stops the run.

Speed matters here (a DataLoader worker runs these for every image of every epoch): a JPEG not yet decoded is
decoded at 1/2, 1/4 or 1/8 scale by libjpeg when the crop still keeps at least the output size in pixels
(`reduce_on_decode`), and batches travel as uint8, normalised where they are used (`normalize_pixel_batch`).
"""

import contextlib
import functools
import io
import logging
import math
import random

import numpy as np
import torch
from PIL import Image

from ..models.image_transforms import map_channels, normalization_coefficients, to_rgb

logger = logging.getLogger(__name__)


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
    other images (and JPEGs already decoded) come back unchanged. Only sets up the decode (`load_pixels` runs it)."""
    left, top, right, bottom = box
    shorter = min(right - left, bottom - top)
    if getattr(image, "format", None) != "JPEG" or shorter < 2 * size:
        return image, box
    width, height = image.size
    factor = shorter / size  # the most the crop may shrink
    with decoding():
        reduced = image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    if reduced is None:  # already decoded, or not reducible
        return image, box
    scale_x, scale_y = reduced[1][2] / width, reduced[1][3] / height
    return image, (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)


def resized_crop(image, box, size, resample=Image.BILINEAR):
    """The `box` of a PIL image (converted to RGB) resized to `size` x `size`, decoded at reduced scale when the
    box allows it (`reduce_on_decode`)."""
    image, box = reduce_on_decode(image, box, size)
    return to_rgb(load_pixels(image)).resize((size, size), resample, box=box)


def padded_crop(image, size, padding, top, left):
    """The `size` x `size` window at `(top, left)` of an RGB PIL image with `padding` px of black border."""
    if padding:
        padded = Image.new("RGB", (image.width + 2 * padding, image.height + 2 * padding))
        padded.paste(image, (padding, padding))
        image = padded
    return image.crop((left, top, left + size, top + size))


# The same crops of CHW arrays of any channel count and pixel type (`data.pixels`): each channel is resized as a
# PIL image, uint8 as 8-bit, any other type as 32-bit float (no rounding to 8 bits), as `map_channels` does.
def resized_crop_pixels(pixels, box, size, resample=Image.BILINEAR):
    """The `box` of a CHW array resized to `size` x `size`."""
    return map_channels(pixels, lambda channel: channel.resize((size, size), resample, box=box))


def padded_crop_pixels(pixels, size, padding, top, left):
    """The `size` x `size` window at `(top, left)` of a CHW array with `padding` zeros on every side."""
    padded = np.pad(pixels, ((0, 0), (padding, padding), (padding, padding))) if padding else pixels
    return np.ascontiguousarray(padded[:, top : top + size, left : left + size])


def flip_pixels(pixels):
    """A CHW (or HW) array mirrored left to right."""
    return np.ascontiguousarray(pixels[..., ::-1])


def to_uint8_array(image):
    """RGB PIL image -> uint8 CHW array (normalised later, on the batch: `data.normalize_pixel_batch`)."""
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


class UndecodableImage(Exception):
    """The image of a dataset cell cannot be decoded: missing, not an image, or truncated. The one data error a run
    skips (reporting and counting it). Raised only around PIL's opening and decoding (`decoding`), so an error
    anywhere else in the data path (augmentation, conversion) stops the run."""


@contextlib.contextmanager
def decoding():
    """Wraps a call into PIL's opening or decoding of a cell's image: whatever it raises means that the image
    cannot be decoded, and becomes `UndecodableImage` (type and message of the original error)."""
    try:
        yield
    except Exception as error:
        raise UndecodableImage(f"{type(error).__name__}: {str(error)[:300]}") from error


def cell_path(cell):
    """The file a dataset cell names (`{"path": ...}` of a `datasets.Image`, or a path string), or `None`."""
    if isinstance(cell, dict):
        return cell.get("path") or None
    return cell if isinstance(cell, str) else None


def row_location(row, cell, split=None):
    """How reports name a dataset row: "train row 4 (photo.jpg)" (the split and the file when known)."""
    path = cell_path(cell)
    return (f"{split} " if split else "") + f"row {row}" + (f" ({path})" if path else "")


def report_skipped_image(where, error):
    """Log that the image at `where` (a row, a file) is skipped because it cannot be decoded, and why."""
    logger.warning("Skipping %s: its image cannot be decoded (%s).", where, error)


def open_image(cell):
    """A dataset cell -> PIL image with only its header read: a PIL image, `{"bytes": ..., "path": ...}` (an
    undecoded `datasets.Image`), raw bytes, a file path or an HWC array. A missing or unreadable image raises
    `UndecodableImage`; a cell of another type (the column holds no images) raises `TypeError`."""
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, np.ndarray):
        return Image.fromarray(cell)
    source = cell
    if isinstance(cell, dict):
        source = cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
    if source is None or source == "":
        raise UndecodableImage("the cell holds neither image bytes nor a path")
    if not isinstance(source, (bytes, bytearray, str)):
        raise TypeError(f"cannot read an image from {type(source).__name__}")
    with decoding():
        return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def load_pixels(image):
    """Decode the pixels of an opened image (at the reduced scale `reduce_on_decode` set up, if any; a no-op once
    decoded). A failing decode raises `UndecodableImage`."""
    with decoding():
        image.load()
    return image


def decode_image(cell):
    """A dataset cell -> decoded PIL image (`open_image`, then `load_pixels`): a truncated file fails here, with
    `UndecodableImage`, and not later."""
    return load_pixels(open_image(cell))


def image_size(cell):
    """`(width, height)` of a dataset cell, from its header only (no decode); `UndecodableImage` if unreadable."""
    image = open_image(cell)
    if image is cell:
        return image.size
    with image:
        return image.size


def normalize_pixel_batch(pixel_values, image_mean, image_std):
    """A uint8 `(B, 3, H, W)` batch (from `SimMIMTransform(uint8=True)`) -> float32 `(x / 255 - mean) / std`, on
    the batch's device, computed as `to_normalized_array` does (`x * a + b`); a float batch is returned as is."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    a, b = coefficients_on(pixel_values.device, channel_values(image_mean), channel_values(image_std))
    return pixel_values.float().mul_(a).add_(b)


def channel_values(values):
    """A scalar or one value per channel -> a tuple (hashable, for the cache below)."""
    return tuple(np.atleast_1d(values).tolist())


@functools.lru_cache(maxsize=16)
def coefficients_on(device, image_mean, image_std):
    """`normalization_coefficients` as `(1, C, 1, 1)` tensors on `device`, copied there once: a copy from host memory
    to a GPU waits for the work queued before it, which every batch would otherwise do."""
    a, b = normalization_coefficients(image_mean, image_std)
    return (torch.as_tensor(a, device=device).view(1, -1, 1, 1), torch.as_tensor(b, device=device).view(1, -1, 1, 1))
