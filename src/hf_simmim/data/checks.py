"""Checks before training: a split that cannot train is refused with what to fix, before any model is built."""

import io
import logging

import numpy as np
from PIL import Image

from .loading import undecoded

logger = logging.getLogger(__name__)


def _image_size(cell):
    """`(width, height)` of a dataset cell, reading only the image header when possible."""
    if isinstance(cell, Image.Image):
        return cell.size
    if isinstance(cell, np.ndarray):
        return (cell.shape[1], cell.shape[0])
    if isinstance(cell, dict):
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        with Image.open(io.BytesIO(cell)) as image:
            return image.size
    with Image.open(cell) as image:
        return image.size


def check_not_empty(dataset, split="train"):
    """Refuse an empty (or missing) split with a message saying what to check."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"The {split} split is empty: there is nothing to train on. Check the data path or dataset name (and "
            "--max_train_samples / --max_eval_samples if set)."
        )


def check_image_dataset(dataset, image_column, min_image_size, split="train", max_checked=64):
    """Refuse, before training starts, a split that cannot train: empty, without `image_column`, with images
    smaller than `min_image_size` (the mask patch), or with no readable image among those checked.

    Checks up to `max_checked` rows spread evenly over the split (headers only). Returns the number of unreadable
    images among them (training skips those).
    """
    check_not_empty(dataset, split)
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The image column {image_column!r} is not in the {split} split; its columns are "
            f"{list(dataset.column_names)}. Pass the right one with --image_column_name."
        )
    count = min(len(dataset), max_checked)
    rows = sorted({int(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    cells = undecoded(dataset, image_column).select(rows)[image_column]
    unreadable, too_small = 0, []
    for row, cell in zip(rows, cells):
        try:
            width, height = _image_size(cell)
        except Exception:  # counted; training skips such images too
            unreadable += 1
            continue
        if min(width, height) < min_image_size:
            too_small.append((row, width, height))
    if too_small:
        row, width, height = too_small[0]
        raise ValueError(
            f"{len(too_small)} of {len(rows)} checked images of the {split} split are smaller than the mask patch "
            f"({min_image_size} px), e.g. row {row} is {width}x{height}: masking squares of {min_image_size} px "
            "needs images at least that large. Remove or upscale the small images, or use a model whose "
            "mask_patch_size fits them."
        )
    if unreadable == len(rows):
        raise ValueError(
            f"None of the {len(rows)} checked images of the {split} split could be read (column {image_column!r}): "
            "check that the column holds images (PNG/JPEG bytes, paths or PIL images)."
        )
    if unreadable:
        logger.warning(
            "%d of %d checked images of the %s split are unreadable; they will be skipped.", unreadable, len(rows), split
        )
    return unreadable
