"""Pixels of any number of channels, at their own precision: a dataset cell read as a channels-first array, and its
header (size, channels, pixel type) read without decoding the pixels. For models that do not take RGB photos:
grayscale, 16-bit, multispectral. Ordinary photos go through the RGB path of `image_ops` instead.

What a cell may hold:
- an image file (path or bytes) or PIL image: its own bands, never squeezed to 8 bits (modes L, I;16, I, F, LA,
  RGB, RGBA, CMYK, ...; a palette image as RGB(A), a bilevel one as L); a multi-page TIFF gives one channel per page;
- a NumPy `.npy` file (path or bytes), or an array (a NumPy array, or the nested lists of an array column of
  Parquet/Arrow): HW, CHW or HWC;
- a TIFF, also multi-band (several samples per pixel, which Pillow cannot read), through `tifffile` when it is
  installed (`pip install hf_simmim[tiff]`).

The channel axis of an array: the first axis when its length is the model's channel count, else the last when that
one's is, else the shorter of the two ends (the first on a tie). So `(5, 64, 64)` and `(64, 64, 5)` are both five
channels of 64 x 64 px.
"""

import io
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .image_ops import decoding, open_image

NPY_MAGIC = b"\x93NUMPY"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
# Pixel types of PIL modes (np.asarray's dtype). Palette and bilevel images are read converted (`image_pixels`).
MODE_DTYPES = {"I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I;16N": "uint16", "I": "int32", "F": "float32"}
# What a palette or bilevel image is read as: its colours (with alpha when it has transparency), or 0/255 grey.
CONVERTED_MODES = {"1": "L", "P": "RGB", "PA": "RGBA"}
# Integer pixels are scaled by their type's largest value, so 8- and 16-bit images both lie in [0, 1] before the
# normalisation; other types (float, 32-bit integers) are taken as they are.
RESCALE_FACTORS = {"uint8": 1 / 255, "uint16": 1 / 65535}


@dataclass(frozen=True)
class PixelHeader:
    """What a cell's header says: size in pixels, channel count and pixel type (a NumPy dtype name)."""

    width: int
    height: int
    channels: int
    dtype: str

    def describe(self):
        return f"{self.width}x{self.height} px, {self.channels} channel(s) of {self.dtype}"


def rescale_factor_for(dtype):
    """The factor that brings pixels of `dtype` to [0, 1]: 1/255 for uint8, 1/65535 for uint16, else 1."""
    return RESCALE_FACTORS.get(np.dtype(dtype).name, 1.0)


def pixel_type_of(rescale_factor):
    """The pixel type a rescale factor is for, in words (the inverse of `rescale_factor_for`)."""
    for name, factor in RESCALE_FACTORS.items():
        if math.isclose(factor, rescale_factor):
            return f"{name} pixels"
    return "floating-point pixels" if rescale_factor == 1.0 else f"pixels scaled by {rescale_factor:.6g}"


def channel_axis(shape, num_channels=None):
    """The channel axis (0 or 2) of a 3-D array shape, by the rule of the module docstring."""
    first, last = shape[0], shape[-1]
    if num_channels is not None and first == num_channels:
        return 0
    if num_channels is not None and last == num_channels:
        return 2
    return 0 if first <= last else 2


def check_array_shape(shape):
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"an array image must be HW, CHW or HWC; this one has shape {tuple(shape)}")


def channels_first(array, num_channels=None):
    """An HW, CHW or HWC array -> CHW (the channel axis by `channel_axis`)."""
    check_array_shape(array.shape)
    if array.ndim == 2:
        return array[None]
    return array if channel_axis(array.shape, num_channels) == 0 else np.moveaxis(array, -1, 0)


def array_header(shape, dtype, num_channels=None):
    check_array_shape(shape)
    if len(shape) == 2:
        return PixelHeader(shape[1], shape[0], 1, np.dtype(dtype).name)
    axis = channel_axis(shape, num_channels)
    height, width = shape[1:] if axis == 0 else shape[:2]
    return PixelHeader(width, height, shape[axis], np.dtype(dtype).name)


# ---------------------------------------------------------------------------------------------- sources
def cell_source(cell):
    """The bytes or path of a file cell (`{"bytes", "path"}`, bytes, or a path), or None for other cells."""
    if isinstance(cell, dict):
        return cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
    return cell if isinstance(cell, (bytes, bytearray, str)) else None


def _starts_with(source, magics, suffixes):
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:8]).startswith(magics)
    return isinstance(source, str) and os.path.splitext(source)[1].lower() in suffixes


def is_npy(source):
    return _starts_with(source, (NPY_MAGIC,), (".npy",))


def reads_with_tifffile(source):
    """Whether `source` is a TIFF and `tifffile` is installed (then it reads the TIFF, also multi-band ones)."""
    if not _starts_with(source, TIFF_MAGICS, (".tif", ".tiff")):
        return False
    try:
        import tifffile  # noqa: F401
    except ImportError:
        return False
    return True


def _file(source):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")


def npy_header(source, num_channels=None):
    with _file(source) as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(handle)
    return array_header(shape, dtype, num_channels)


def _tiff_series(source):
    """`(series shape, axes, dtype)` of a TIFF's first series, by tifffile."""
    import tifffile

    with _file(source) as handle, tifffile.TiffFile(handle) as tiff:
        series = tiff.series[0]
        return series.shape, series.axes, series.dtype


def tiff_header(source):
    shape, axes, dtype = _tiff_series(source)
    check_array_shape(shape)
    if len(shape) == 2:
        return PixelHeader(shape[1], shape[0], 1, np.dtype(dtype).name)
    height, width, channels = (shape[0], shape[1], shape[2]) if axes.endswith("S") else (*shape[1:], shape[0])
    return PixelHeader(width, height, channels, np.dtype(dtype).name)


def read_tiff(source):
    import tifffile

    _, axes, _ = _tiff_series(source)
    with _file(source) as handle:
        array = tifffile.imread(handle)
    check_array_shape(array.shape)
    if array.ndim == 2:
        return array[None]
    return np.moveaxis(array, -1, 0) if axes.endswith("S") else array


# ---------------------------------------------------------------------------------------------- PIL images
def pages(image):
    """The pages of a multi-page TIFF (each a channel group), else `[image]`: only TIFF pages are bands; the
    frames of an animation are not."""
    count = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
    if count == 1:
        return [image]
    frames = []
    for index in range(count):
        image.seek(index)
        frames.append(image.copy())
    return frames


def image_pixels(image):
    """A PIL image -> CHW array of its bands at their own precision (a multi-page TIFF: its pages stacked)."""
    arrays = []
    for page in pages(image):
        mode = read_mode(page)
        array = np.asarray(page if mode == page.mode else page.convert(mode))
        arrays.append(array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0))
    if len({(a.shape[1:], a.dtype) for a in arrays}) > 1:
        raise ValueError("the pages of this TIFF differ in size or pixel type: they cannot be stacked as channels")
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def read_mode(image):
    """The PIL mode an image is read in: its own, but for palette and bilevel images (`CONVERTED_MODES`)."""
    if image.mode == "P" and "transparency" in image.info:
        return "RGBA"
    return CONVERTED_MODES.get(image.mode, image.mode)


def image_header(image):
    mode = read_mode(image)
    bands = Image.getmodebands(mode)
    count = getattr(image, "n_frames", 1) if image.format == "TIFF" else 1
    return PixelHeader(image.width, image.height, bands * count, MODE_DTYPES.get(mode, "uint8"))


# ---------------------------------------------------------------------------------------------- cells
def read_pixels(cell, num_channels=None):
    """A dataset cell (module docstring) -> CHW array in its own pixel type. A cell that cannot be decoded raises
    `UndecodableImage`; a cell of another type `TypeError`."""
    if isinstance(cell, (np.ndarray, list, tuple)):
        return channels_first(np.asarray(cell), num_channels)
    source = cell_source(cell)
    if source is not None and is_npy(source):
        with decoding(), _file(source) as handle:
            return channels_first(np.load(handle, allow_pickle=False), num_channels)
    if source is not None and reads_with_tifffile(source):
        with decoding():
            return read_tiff(source)
    image = open_image(cell)
    with decoding():
        return image_pixels(image)


def pixel_header(cell, num_channels=None):
    """The `PixelHeader` of a dataset cell, from its header only (no pixels decoded), for the cells `read_pixels`
    takes. A header that cannot be read raises `UndecodableImage`."""
    if isinstance(cell, (np.ndarray, list, tuple)):
        array = np.asarray(cell)
        return array_header(array.shape, array.dtype, num_channels)
    source = cell_source(cell)
    if source is not None and (is_npy(source) or reads_with_tifffile(source)):
        with decoding():
            return npy_header(source, num_channels) if is_npy(source) else tiff_header(source)
    image = open_image(cell)
    try:
        with decoding():
            return image_header(image)
    finally:
        if image is not cell:
            image.close()


def is_array_cell(cell):
    """Whether a cell holds an array (in memory or a `.npy` file) rather than an image."""
    if isinstance(cell, (np.ndarray, list, tuple)):
        return True
    source = cell_source(cell)
    return source is not None and is_npy(source)

