"""Per-channel mean and standard deviation of a dataset's images in one streaming pass, for the image processor's
`image_mean` / `image_std` when the images are not RGB photos (ImageNet's statistics are RGB's).

Each image is read as the run reads it (`data.pixels` for images that keep their own channels, or converted to
8-bit RGB), at its own size (not a crop), and scaled by the run's `rescale_factor`. Per image, float64 sums give
its count, mean and sum of squared deviations per channel; images are merged one by one with the parallel update of
Chan, Golub and LeVeque, so the pass holds three numbers per channel whatever the data size, and does not lose
digits as a running sum of squares would. The standard deviation is the population one (ddof=0) over every pixel
of every image, what NumPy's `std` of all pixels of a channel gives.
"""

from dataclasses import dataclass

import numpy as np

from ..models.image_transforms import to_rgb
from .checks import first_readable_header, header_rows, run_pixel_format
from .image_ops import UndecodableImage, decode_image
from .pixels import read_pixels, rescale_factor_for


@dataclass(frozen=True)
class ChannelStatistics:
    """The result of `channel_statistics`: `mean` and `std` (one value per channel, in units of pixels x
    `rescale_factor`), the `pixels` per channel and `images` they come from, the `skipped` images that could not be
    decoded, and the `rescale_factor` and `pixel_type` they were read with."""

    mean: list
    std: list
    pixels: int
    images: int
    skipped: int
    rescale_factor: float
    pixel_type: str

    def describe(self):
        values = ", ".join(f"{m:.6g} +/- {s:.6g}" for m, s in zip(self.mean, self.std))
        return (
            f"{len(self.mean)} channel(s) of {self.pixel_type} x {self.rescale_factor:.6g}: mean +/- std {values} "
            f"({self.images} images, {self.pixels:,} pixels per channel, {self.skipped} skipped)"
        )


def merge_moments(first, second):
    """Two `(count, mean, m2)` summaries (per-channel `mean` and sums of squared deviations `m2`) -> their union's."""
    count_a, mean_a, m2_a = first
    count_b, mean_b, m2_b = second
    count = count_a + count_b
    delta = mean_b - mean_a
    return count, mean_a + delta * (count_b / count), m2_a + m2_b + delta**2 * (count_a * count_b / count)


def image_moments(pixels, rescale_factor):
    """A CHW array -> `(pixels per channel, per-channel mean, per-channel m2)`, in float64, after `rescale_factor`."""
    values = pixels.reshape(pixels.shape[0], -1).astype(np.float64) * rescale_factor
    mean = values.mean(axis=1)
    return values.shape[1], mean, ((values - mean[:, None]) ** 2).sum(axis=1)


def read_for_statistics(cell, num_channels, convert_rgb):
    """A cell's CHW array as the run reads it: 8-bit RGB when `convert_rgb`, else its own channels."""
    if convert_rgb:
        return np.asarray(to_rgb(decode_image(cell))).transpose(2, 0, 1)
    return read_pixels(cell, num_channels)


def channel_statistics(dataset, image_column, num_channels=None, rescale_factor=None, convert_rgb=False,
                       progress=True):
    """`ChannelStatistics` of the images of `dataset[image_column]` (module docstring), with a progress bar.

    `num_channels` and `rescale_factor` default to the first decodable image's channel count and pixel type
    (`pixels.rescale_factor_for`: 1/255 for 8-bit, 1/65535 for 16-bit, else 1); an image of another channel count
    raises `ValueError` naming it. Images that cannot be decoded are counted in `skipped` and left out."""
    from tqdm.auto import tqdm

    moments, images, skipped, pixel_type = None, 0, 0, None
    rows = tqdm(header_rows(dataset, [image_column]), total=len(dataset), desc="Per-channel mean and std",
                unit="image", disable=not progress)
    for row, (cell,) in rows:
        try:
            pixels = read_for_statistics(cell, num_channels, convert_rgb)
        except UndecodableImage:
            skipped += 1
            continue
        if pixel_type is None:
            pixel_type, num_channels = pixels.dtype.name, num_channels or pixels.shape[0]
            rescale_factor = rescale_factor_for(pixels.dtype) if rescale_factor is None else rescale_factor
        if pixels.shape[0] != num_channels:
            raise ValueError(
                f"Row {row} of the data has {pixels.shape[0]} channel(s) where the others have {num_channels}: every "
                "image needs the same channels."
            )
        current = image_moments(pixels, rescale_factor)
        moments = current if moments is None else merge_moments(moments, current)
        images += 1
    if moments is None:
        raise ValueError(f"None of the {len(dataset)} images of column {image_column!r} could be decoded.")
    count, mean, m2 = moments
    return ChannelStatistics(
        mean.tolist(), np.sqrt(m2 / count).tolist(), int(count), images, skipped, rescale_factor, pixel_type
    )


def dataset_statistics(dataset, image_column, num_channels=None, progress=True):
    """`ChannelStatistics` of the images as a run of a `num_channels` model reads them (`checks.run_pixel_format`:
    a 3-channel model reads photos as RGB; default: the first image's own channel count), what `hf-simmim stats`
    prints and the run computes when no mean and std are given."""
    if num_channels is None:
        first = first_readable_header(dataset, image_column)
        if first is None:
            raise ValueError(f"None of the {len(dataset)} images of column {image_column!r} could be read.")
        num_channels = first[2].channels
    convert_rgb, rescale_factor = run_pixel_format(dataset, image_column, num_channels)
    return channel_statistics(dataset, image_column, num_channels, rescale_factor, convert_rgb, progress)
