"""Checks before training: a split that cannot train is refused with what to fix, and the images whose header
cannot be read are found (and reported once) before the first step."""

import os

import torch

from .image_ops import UndecodableImage, image_size, report_skipped_image, row_location
from .loading import undecoded

HEADER_BATCH_SIZE = 1024  # rows read from the dataset at a time by `check_image_dataset`
NAMED_EXAMPLES = 5  # rows named in a message about many images


def is_main_process():
    """Whether this process speaks for the run: rank 0 of torch.distributed once it is set up, else of the RANK that
    torchrun, accelerate and deepspeed set before the script starts (a single process is the main one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


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

    Every image is checked, from its header only. Returns the rows whose header cannot be read, in order: give them
    to `SeededImageDataset(unreadable_rows=...)`, which leaves them out and counts them. Each is reported here (split,
    row, file, reason), by the main process only: every process runs the check, and a run reports an image once.
    """
    check_not_empty(dataset, split)
    if image_column not in dataset.column_names:
        raise ValueError(
            f"The image column {image_column!r} is not in the {split} split; its columns are "
            f"{list(dataset.column_names)}. Pass the right one with --image_column_name."
        )
    unreadable, too_small = {}, []
    for row, cell, size in image_header_sizes(dataset, image_column):
        if isinstance(size, UndecodableImage):
            unreadable[row] = row_location(row, cell, split), size
        elif min(size) < min_image_size:
            too_small.append(f"{row_location(row, cell)} is {size[0]}x{size[1]}")
    if too_small:
        raise ValueError(
            f"{len(too_small)} of {len(dataset)} images of the {split} split are smaller than {min_image_size} px "
            f"({'; '.join(too_small[:NAMED_EXAMPLES])}{'; ...' if len(too_small) > NAMED_EXAMPLES else ''}), the "
            "smallest side the run can use (the mask patch when pretraining). Remove or upscale them, or use a "
            "model whose sizes fit them."
        )
    if len(unreadable) == len(dataset):
        where, error = next(iter(unreadable.values()))
        raise ValueError(
            f"None of the {len(dataset)} checked images of the {split} split could be read (column "
            f"{image_column!r}; e.g. {where}: {error}): check that the column holds images (PNG/JPEG bytes, paths "
            "or PIL images)."
        )
    if is_main_process():
        for where, error in unreadable.values():
            report_skipped_image(where, error)
    return list(unreadable)
