"""Checks before training: a split that cannot train is refused with what to fix, and the images whose header
cannot be read are found (and reported once) before the first step."""

import logging
import os

import torch

from .image_ops import UndecodableImage, image_size, report_skipped_image, row_location
from .loading import undecoded
from .pixels import PixelHeader, is_array_cell, pixel_header, rescale_factor_for

logger = logging.getLogger(__name__)

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


def header_rows(dataset, columns):
    """Yield `(row, cells)` for every row of `dataset`: the cells of `columns`, read undecoded in batches."""
    table = undecoded(dataset.select_columns(columns), *columns)
    for start, batch in enumerate(table.iter(batch_size=HEADER_BATCH_SIZE)):
        for offset in range(len(batch[columns[0]])):
            yield start * HEADER_BATCH_SIZE + offset, [batch[column][offset] for column in columns]


def read_header(cell, processor=None):
    """The `PixelHeader` of an image as the run reads it, or the `UndecodableImage` when its header cannot be read:
    converted to RGB (no `processor`, or one that `converts_to_rgb`), only its size is read (3 channels of uint8 is
    what the conversion gives); otherwise its own channels and pixel type."""
    try:
        if processor is None or processor.converts_to_rgb:
            return PixelHeader(*image_size(cell), 3, "uint8")
        return pixel_header(cell, processor.num_channels)
    except UndecodableImage as error:
        return error


def format_problem(header, processor):
    """Why an image's channels or pixel type do not fit a run that does not convert to RGB, or None."""
    if processor is None or processor.converts_to_rgb:
        return None
    if header.channels != processor.num_channels:
        return f"has {header.channels} channel(s), the model takes num_channels={processor.num_channels}"
    if rescale_factor_for(header.dtype) != processor.rescale_factor:
        return (
            f"holds {header.dtype} pixels (scaled by {rescale_factor_for(header.dtype):.6g}) where the run scales by "
            f"{processor.rescale_factor:.6g} (the pixel type of its first image): convert the images to one type"
        )
    return None


def mask_problem(mask_cell, header):
    """Why a user mask does not fit its image (`header`), or None."""
    try:
        mask = pixel_header(mask_cell)
    except UndecodableImage as error:
        return f"has a mask that cannot be read ({error})"
    if (mask.width, mask.height) != (header.width, header.height):
        return f"has a {mask.width}x{mask.height} px mask for a {header.width}x{header.height} px image"
    return None


def refuse(problems, total, split, what, fix):
    if problems:
        named = "; ".join(problems[:NAMED_EXAMPLES]) + ("; ..." if len(problems) > NAMED_EXAMPLES else "")
        raise ValueError(f"{len(problems)} of {total} images of the {split} split {what} ({named}). {fix}")


def check_columns(dataset, columns, split):
    """Refuse a missing column: `columns` holds `(column or None, what it holds, the flag that names it)`."""
    for column, what, flag in columns:
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"The {what} column {column!r} is not in the {split} split; its columns are "
                f"{list(dataset.column_names)}. Pass the right one with {flag}."
            )


def check_image_dataset(dataset, image_column, min_image_size, split="train", processor=None, mask_column=None,
                        report=True, sizes=None):
    """Refuse, before training starts, a split that cannot train: empty, without `image_column` (or `mask_column`),
    with any image smaller than `min_image_size` (named by row and file), with no readable image at all; for a
    `processor` that does not convert to RGB, any image of another channel count or pixel type; with a
    `mask_column`, any user mask that cannot be read or is not its image's size.

    Every image is checked, from its header only. Returns the rows whose header cannot be read, in order: give them
    to `SeededImageDataset(unreadable_rows=...)`, which leaves them out and counts them. Each is reported here (split,
    row, file, reason), by the main process only: every process runs the check, and a run reports an image once
    (`report=False`: not here, for rows that are reported when read, as a stream's first rows are). `sizes`: a dict
    to fill with the sizes of the readable images, `{(width, height): first row's location}`, two at most (whether
    they are all of one size, which the device crops need), so that no other pass reads the headers again.
    """
    check_not_empty(dataset, split)
    check_columns(dataset, [(image_column, "image", "--image_column_name"), (mask_column, "mask", "--mask_column")], split)
    unreadable, too_small, wrong_format, wrong_masks = {}, [], [], []
    for row, cells in header_rows(dataset, [image_column] + [mask_column] * bool(mask_column)):
        header = read_header(cells[0], processor)
        if isinstance(header, UndecodableImage):
            unreadable[row] = row_location(row, cells[0], split), header
            continue
        if sizes is not None and len(sizes) < 2:
            sizes.setdefault((header.width, header.height), row_location(row, cells[0]))
        if min(header.width, header.height) < min_image_size:
            too_small.append(f"{row_location(row, cells[0])} is {header.width}x{header.height}")
        for problems, problem in ((wrong_format, format_problem(header, processor)),
                                  (wrong_masks, mask_column and mask_problem(cells[1], header))):
            if problem:
                problems.append(f"{row_location(row, cells[0])} {problem}")
    total = len(dataset)
    refuse(too_small, total, split, f"are smaller than {min_image_size} px", (
        "That is the smallest side the run can use (the mask patch when pretraining). Remove or upscale them, or "
        "use a model whose sizes fit them."))
    refuse(wrong_format, total, split, "do not fit the run", "Every image must have the model's channels and one "
           "pixel type.")
    refuse(wrong_masks, total, split, f"have no usable user mask (column {mask_column!r})", "Each mask must read "
           "as an image or array of its image's size.")
    if len(unreadable) == total:
        where, error = next(iter(unreadable.values()))
        raise ValueError(
            f"None of the {total} checked images of the {split} split could be read (column "
            f"{image_column!r}; e.g. {where}: {error}): check that the column holds images (PNG/JPEG bytes, paths "
            "or PIL images)."
        )
    if report and is_main_process():
        for where, error in unreadable.values():
            report_skipped_image(where, error)
    return list(unreadable)


def run_pixel_format(dataset, image_column, num_channels, split="train"):
    """How a run reads the images of `dataset`, decided from its first readable image: `(convert_rgb,
    rescale_factor)`.

    A 3-channel model reading image files (photos) converts them to 8-bit RGB and rescales by 1/255, as it always
    has (grayscale and 16-bit images too: a warning says when images of more than 8 bits are squeezed). Any other
    model, or data of arrays (`.npy`, array columns), keeps each image's own channels, rescaled by the factor of the
    first image's pixel type (`pixels.rescale_factor_for`); that image must have the model's channel count, else
    `ValueError` names both. `check_image_dataset` then checks every image against this format."""
    first = first_readable_header(dataset, image_column, num_channels)
    if first is None:
        return num_channels == 3, 1 / 255  # nothing readable: `check_image_dataset` refuses the split
    row, cell, header = first
    if num_channels == 3 and not is_array_cell(cell) and header.channels <= 4:
        if header.dtype != "uint8":
            logger.warning(
                "The %s images hold %s pixels (%s: %s); this 3-channel model converts them to 8-bit RGB. To keep "
                "their precision, train a model with their channel count (run_mim.py --num_channels %d).",
                split, header.dtype, row_location(row, cell), header.describe(), header.channels,
            )
        return True, 1 / 255
    if header.channels != num_channels:
        raise ValueError(
            f"The {split} images have {header.channels} channel(s) ({row_location(row, cell)}: "
            f"{header.describe()}) but the model takes num_channels={num_channels}. Pretrain a model for "
            f"{header.channels} channels (run_mim.py --num_channels {header.channels}), or use a checkpoint made "
            "for them."
        )
    return False, rescale_factor_for(header.dtype)


def first_readable_header(dataset, image_column, num_channels=None):
    """`(row, cell, PixelHeader)` of the first image of `dataset` whose header reads, or None."""
    for row, (cell,) in header_rows(dataset, [image_column]):
        try:
            return row, cell, pixel_header(cell, num_channels)
        except UndecodableImage:
            continue  # reported by the check
    return None
