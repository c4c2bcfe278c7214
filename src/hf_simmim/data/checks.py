"""Checks before training: a split that cannot train is refused with what to fix, before any model is built."""

import logging

from .image_ops import UndecodableImage, cell_path, image_size
from .loading import undecoded

logger = logging.getLogger(__name__)

HEADER_BATCH_SIZE = 1024  # rows read from the dataset at a time by `check_image_dataset`
NAMED_EXAMPLES = 5  # rows named in a message about many images


def _row_name(row, cell):
    path = cell_path(cell)
    return f"row {row}" + (f" ({path})" if path else "")


def check_not_empty(dataset, split="train"):
    """Refuse an empty (or missing) split with a message saying what to check."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"The {split} split is empty: there is nothing to train on. Check the data path or dataset name (and "
            "--max_train_samples / --max_eval_samples if set)."
        )


def image_header_sizes(dataset, image_column):
    """Yield `(row, cell, (width, height) or the UndecodableImage)` for every row of `dataset`, the size read from
    the image header only (no decode), the undecoded column read in batches."""
    cells = undecoded(dataset, image_column).select_columns([image_column])
    for start, batch in enumerate(cells.iter(batch_size=HEADER_BATCH_SIZE)):
        for offset, cell in enumerate(batch[image_column]):
            try:
                size = image_size(cell)
            except UndecodableImage as error:
                size = error
            yield start * HEADER_BATCH_SIZE + offset, cell, size


def check_image_dataset(dataset, image_column, min_image_size, split="train"):
    """Refuse, before training starts, a split that cannot train: empty, without `image_column`, with any image
    smaller than `min_image_size` (named by row and file), or with no readable image at all.

    Every image is checked, from its header only. Images whose header cannot be read are reported (row, file,
    reason) and counted: training skips them. Returns that count.
    """
    check_not_empty(dataset, split)
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The image column {image_column!r} is not in the {split} split; its columns are "
            f"{list(dataset.column_names)}. Pass the right one with --image_column_name."
        )
    unreadable, too_small = [], []
    for row, cell, size in image_header_sizes(dataset, image_column):
        if isinstance(size, UndecodableImage):
            unreadable.append(f"{_row_name(row, cell)}: {size}")
        elif min(size) < min_image_size:
            too_small.append(f"{_row_name(row, cell)} is {size[0]}x{size[1]}")
    if too_small:
        raise ValueError(
            f"{len(too_small)} of {len(dataset)} images of the {split} split are smaller than {min_image_size} px "
            f"({'; '.join(too_small[:NAMED_EXAMPLES])}{'; ...' if len(too_small) > NAMED_EXAMPLES else ''}), the "
            "smallest side the run can use (the mask patch when pretraining, the crop when fine-tuning). Remove or "
            "upscale them, or use a model whose sizes fit them."
        )
    if len(unreadable) == len(dataset):
        raise ValueError(
            f"None of the {len(dataset)} checked images of the {split} split could be read (column "
            f"{image_column!r}; e.g. {unreadable[0]}): check that the column holds images (PNG/JPEG bytes, paths or "
            "PIL images)."
        )
    if unreadable:
        logger.warning(
            "%d of %d images of the %s split cannot be read; training will skip them:\n  %s", len(unreadable),
            len(dataset), split, "\n  ".join(unreadable),
        )
    return len(unreadable)
