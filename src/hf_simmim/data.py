"""From a dataset row to a model batch: decode and convert the image, augment (or centre-crop), normalise, draw a
SimMIM mask, and collate.

`SimMIMTransform` works both ways `datasets` applies functions:

    train = dataset.with_transform(SimMIMTransform(processor, train=True))      # fresh crop and mask every read
    evals = dataset.map(SimMIMTransform(processor, train=False, mask_seed=0),     # fixed masks, reproducible
                        batched=True, with_indices=True, remove_columns=dataset.column_names)

and `collate_fn` stacks its rows into `pixel_values` / `bool_masked_pos` (/ `labels`) tensors.
"""

import io
import logging
import multiprocessing
import random

import numpy as np
import torch
from PIL import Image

from .image_transforms import random_horizontal_flip, random_resized_crop, resize_center_crop, to_normalized_array, to_rgb

logger = logging.getLogger(__name__)


def decode_image(value):
    """A dataset cell -> PIL image: a PIL image, `{"bytes": ..., "path": ...}` (an undecoded `datasets.Image`),
    raw bytes, or a file path."""
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
    image.load()  # decode now, so a truncated file fails here and not later
    return image


class SkippedImages:
    """A count of unreadable images, shared by the main process and forked DataLoader workers (a pickled copy,
    e.g. in a spawned worker, counts on its own)."""

    def __init__(self, start=0):
        self._value = multiprocessing.Value("i", start)

    def __getstate__(self):
        return {"start": self.count}

    def __setstate__(self, state):
        self.__init__(state["start"])

    def add(self, n=1):
        with self._value.get_lock():
            self._value.value += n

    @property
    def count(self):
        return self._value.value


class SimMIMTransform:
    """Batch function for `Dataset.set_transform` / `with_transform` / `map(batched=True)`.

    Adds `pixel_values` (float32 CHW, normalised) and `bool_masked_pos` (bool `(g, g)`) per row and keeps the
    columns named in `keep_columns` (e.g. `label`). An image that cannot be decoded yields `pixel_values=None`, is
    logged and counted, and `collate_fn` drops the row.

    Args:
        image_processor: a `SimMIMImageProcessor` (image size, normalisation, mask and augmentation settings).
        train: the paper's RandomResizedCrop + horizontal flip; otherwise resize + centre crop.
        image_column: the column holding images.
        with_mask: add `bool_masked_pos` (pretraining); off for classification.
        mask_seed: fixed masks: with `map(..., with_indices=True)` each row's mask is seeded by (mask_seed, index),
            so it does not depend on batching or order.
        rng: a `random.Random` for the augmentation (default: the `random` module, which torch seeds per worker).
    """

    def __init__(
        self,
        image_processor,
        train=True,
        image_column="image",
        with_mask=True,
        mask_seed=None,
        keep_columns=("label", "labels"),
        rng=None,
        skipped=None,
    ):
        self.processor = image_processor
        self.train = train
        self.image_column = image_column
        self.with_mask = with_mask
        self.mask_seed = mask_seed
        self.keep_columns = tuple(keep_columns)
        self.rng = rng if rng is not None else random
        self.mask_generator = image_processor.mask_generator(seed=mask_seed) if with_mask else None
        self.skipped = skipped if skipped is not None else SkippedImages()

    def image_to_array(self, image):
        image = to_rgb(image)
        p = self.processor
        if self.train:
            image = random_resized_crop(image, p.image_size, tuple(p.crop_scale), tuple(p.crop_ratio), self.rng)
            image = random_horizontal_flip(image, p.hflip_prob, self.rng)
        else:
            image = resize_center_crop(image, p.image_size, p.crop_pct)
        return to_normalized_array(image, p.image_mean, p.image_std)

    def _mask(self, index):
        if self.mask_seed is not None and index is not None:
            return self.mask_generator(generator=torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(index)))
        return self.mask_generator()

    def __call__(self, examples, indices=None):
        if self.image_column not in examples:
            raise KeyError(
                f"image column {self.image_column!r} is not in the dataset (columns: {sorted(examples)}): pass "
                "the right column name (--image_column_name)."
            )
        pixel_values, masks = [], []
        for position, cell in enumerate(examples[self.image_column]):
            try:
                array = self.image_to_array(decode_image(cell))
            except Exception as error:  # a corrupt or unreadable image must never stop an epoch
                self.skipped.add()
                logger.warning("Skipping an unreadable image (%s: %s).", type(error).__name__, error)
                array = None
            pixel_values.append(array)
            if self.with_mask:
                masks.append(self._mask(None if indices is None else indices[position]))
        output = {"pixel_values": pixel_values}
        if self.with_mask:
            output["bool_masked_pos"] = masks
        for column in self.keep_columns:
            if column in examples:
                output[column] = examples[column]
        return output


def collate_fn(examples):
    """Rows from `SimMIMTransform` -> a batch of tensors; rows whose image could not be read are dropped."""
    rows = [row for row in examples if row.get("pixel_values") is not None]
    if not rows:
        raise ValueError("Every image in this batch was unreadable; check the dataset's image column.")
    batch = {"pixel_values": torch.stack([torch.as_tensor(np.asarray(r["pixel_values"]), dtype=torch.float32) for r in rows])}
    if "bool_masked_pos" in rows[0]:
        batch["bool_masked_pos"] = torch.stack([torch.as_tensor(np.asarray(r["bool_masked_pos"])).bool() for r in rows])
    for key in ("label", "labels"):
        if key in rows[0]:
            batch["labels"] = torch.as_tensor([r[key] for r in rows])
    return batch
