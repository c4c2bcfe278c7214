"""From a dataset row to a model batch: decode and convert the image, augment (or centre-crop), normalise, draw a
SimMIM mask, and collate.

`SimMIMTransform` works both ways `datasets` applies functions:

    train = dataset.with_transform(SimMIMTransform(processor, train=True))      # fresh crop and mask every read
    evals = dataset.map(SimMIMTransform(processor, train=False, mask_seed=0),     # fixed masks, reproducible
                        batched=True, with_indices=True, remove_columns=dataset.column_names)

and `collate_fn` stacks its rows into `pixel_values` / `bool_masked_pos` (/ `labels`) tensors.
`SeededImageDataset` serves a dataset to the `Trainer` (pretraining and fine-tuning alike) with crops and masks drawn
per (seed, epoch, row): exact resumption, and the same batches whatever the number of processes.

Data errors are never silent: an image that cannot be decoded (`image_ops.UndecodableImage`) is skipped, reported
with its row or file and the reason, and counted; any other error (in augmentation, conversion, masking) is a bug
and stops the run with its traceback.
"""

import logging
import multiprocessing
import random

import numpy as np
import torch

from ..models.image_transforms import resize_center_crop, to_normalized_array, to_rgb
from .augmentation import pretraining_augmentation, random_erasing
from .image_ops import UndecodableImage, cell_path, decode_image, open_image, to_uint8_array
from .loading import undecoded

logger = logging.getLogger(__name__)


class SimMIMTransform:
    """Batch function for `Dataset.set_transform` / `with_transform` / `map(batched=True)`.

    Adds `pixel_values` (float32 CHW, normalised; or uint8, see `uint8`) and `bool_masked_pos` (bool `(g, g)`) per
    row and keeps the columns named in `keep_columns` (e.g. `label`). An image that cannot be decoded yields
    `pixel_values=None` and a warning naming it (file, or position in the batch), and `collate_fn` drops the row;
    any other error propagates.

    Args:
        image_processor: a `SimMIMImageProcessor` (image size, evaluation crop, normalisation, mask settings).
        train: apply `augmentation`; otherwise the processor's resize + centre crop.
        augmentation: an `AugmentationPreset` (default: the official pretraining one at the processor's size).
        image_column: the column holding images.
        with_mask: add `bool_masked_pos` (pretraining); off for classification.
        mask_seed: fixed masks: with `map(..., with_indices=True)` each row's mask is seeded by (mask_seed, index),
            so it does not depend on batching or order.
        rng: a `random.Random` for the augmentation (default: the `random` module, which torch seeds per worker).
        uint8: give `pixel_values` as uint8 CHW, not normalised: 4x less to copy between DataLoader workers, into
            pinned memory and to the GPU, and no float work per image on the CPU. The batch is normalised where
            it is used (`normalize_pixel_batch`; `SimMIMTrainer` does it on the device). Not with random erasing,
            which works on normalised pixels.
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
        uint8=False,
        augmentation=None,
    ):
        self.processor = image_processor
        self.train = train
        self.image_column = image_column
        self.with_mask = with_mask
        self.mask_seed = mask_seed
        self.keep_columns = tuple(keep_columns)
        self.rng = rng if rng is not None else random
        self.mask_generator = image_processor.mask_generator(seed=mask_seed) if with_mask else None
        self.uint8 = uint8
        self.augmentation = augmentation or pretraining_augmentation(image_processor.image_size)
        if augmentation is not None and augmentation.image_size != image_processor.image_size:
            raise ValueError(
                f"The augmentation crops to {augmentation.image_size} px but the image processor gives "
                f"{image_processor.image_size} px: build both from the same model config."
            )
        if uint8 and train and self.augmentation.random_erasing:
            raise ValueError("uint8=True cannot be combined with random erasing (it needs normalised pixels).")

    def image_to_array(self, cell):
        """A dataset cell -> CHW array. Raises `UndecodableImage` (only) when the cell's image cannot be decoded;
        training decodes inside the crop (`AugmentationPreset.augment`), so a JPEG can be decoded at reduced scale."""
        if self.train:
            image = self.augmentation.augment(open_image(cell), self.rng)
        else:
            p = self.processor
            image = resize_center_crop(to_rgb(decode_image(cell)), p.image_size, p.crop_pct, p.resample)
        if self.uint8:
            return to_uint8_array(image)
        array = to_normalized_array(image, self.processor.image_mean, self.processor.image_std)
        if self.train and self.augmentation.random_erasing:
            array = random_erasing(array, self.augmentation.random_erasing, self.rng)
        return array

    def _mask(self, index):
        if self.mask_seed is not None and index is not None:
            return self.mask_generator(generator=torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(index)))
        return self.mask_generator()

    def transform_row(self, example, mask_index=None):
        """One row (column -> value) -> `(output row, error)`: the output holds `pixel_values` (None when the image
        cannot be decoded; `error` is then that `UndecodableImage`, else None), `bool_masked_pos` (seeded by
        `mask_index` with `mask_seed`) and the kept columns."""
        error = None
        try:
            pixel_values = self.image_to_array(example[self.image_column])
        except UndecodableImage as undecodable:
            pixel_values, error = None, undecodable
        output = {"pixel_values": pixel_values}
        if self.with_mask:
            output["bool_masked_pos"] = self._mask(mask_index)
        output.update({column: example[column] for column in self.keep_columns if column in example})
        return output, error

    def require_image_column(self, columns):
        if self.image_column not in columns:
            raise KeyError(
                f"image column {self.image_column!r} is not in the dataset (columns: {sorted(columns)}): pass "
                "the right column name (--image_column_name)."
            )

    def __call__(self, examples, indices=None):
        self.require_image_column(examples)
        columns = ["pixel_values"] + ["bool_masked_pos"] * self.with_mask
        output = {name: [] for name in columns + [c for c in self.keep_columns if c in examples]}
        for position, cell in enumerate(examples[self.image_column]):
            example = {name: values[position] for name, values in examples.items()}
            row, error = self.transform_row(example, None if indices is None else indices[position])
            if error is not None:
                report_skipped_image(cell_path(cell) or f"batch position {position}", error)
            for name, values in output.items():
                values.append(row[name])
        return output


def report_skipped_image(where, error):
    """Log that the image at `where` (a row, a file) is skipped because it cannot be decoded, and why."""
    logger.warning("Skipping an image that cannot be decoded: %s (%s).", where, error)


def collate_fn(examples):
    """Rows from `SimMIMTransform` -> a batch of tensors; rows whose image could not be read are dropped.
    `pixel_values` stay uint8 when the transform gave uint8 (`SimMIMTransform(uint8=True)`), else float32."""
    rows = [row for row in examples if row.get("pixel_values") is not None]
    if not rows:
        raise ValueError("No image of this batch could be decoded; check the dataset's image column.")
    arrays = [np.asarray(r["pixel_values"]) for r in rows]
    dtype = torch.uint8 if all(a.dtype == np.uint8 for a in arrays) else torch.float32
    batch = {"pixel_values": torch.stack([torch.as_tensor(a, dtype=dtype) for a in arrays])}
    if "bool_masked_pos" in rows[0]:
        batch["bool_masked_pos"] = torch.stack([torch.as_tensor(np.asarray(r["bool_masked_pos"])).bool() for r in rows])
    for key in ("label", "labels"):
        if key in rows[0]:
            batch["labels"] = torch.as_tensor([r[key] for r in rows])
    return batch


class SeededImageDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` served to the `Trainer` through `SimMIMTransform` (pretraining or fine-tuning, training
    or evaluation), with the random crop, flip and mask of each row drawn from `(seed, epoch, row index)` instead
    of a global random stream.

    So a row's sample does not depend on batch size, number of processes, DataLoader workers or prefetching: a
    run resumed from a checkpoint sees exactly the data of an uninterrupted run, and 2 processes x batch b see
    the batches of 1 process x batch 2b. A fresh crop and mask is still drawn every epoch: the Trainer's
    `EpochCallback` calls `set_epoch` (a shared value, so forked DataLoader workers see it too).

    An image that cannot be decoded is skipped (`collate_fn` drops its row); the first read of it logs a warning
    naming the split, the row (and file) and the reason, and flags the row, so `unreadable_mask` counts each bad
    image once however many epochs read it.

    Args:
        dataset: a `datasets.Dataset` (its image column is read undecoded, so that a bad image reaches the
            transform instead of failing inside `datasets`).
        transform: a `SimMIMTransform` (train or eval); it is called one row at a time with its own seeds.
        seed: the run's seed.
        split: the split's name in the warnings ("train", "validation").
    """

    def __init__(self, dataset, transform, seed=0, split="train"):
        transform.require_image_column(dataset.column_names)
        self.dataset = undecoded(dataset, transform.image_column)
        self.transform = transform
        if transform.with_mask and transform.mask_seed is None:
            transform.mask_seed = 0  # masks come from the row seeds below: one seeded generator per row
        self.seed = int(seed)
        self.split = split
        # shared memory: DataLoader workers forked from this process update the same epoch and bad-row flags
        self._epoch = multiprocessing.Value("i", 0)
        self._unreadable = multiprocessing.Array("b", max(len(self.dataset), 1), lock=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_epoch"] = self.epoch
        state["_unreadable"] = bytes(self._unreadable)
        return state

    def __setstate__(self, state):
        epoch, unreadable = state.pop("_epoch"), state.pop("_unreadable")
        self.__dict__.update(state)
        self._epoch = multiprocessing.Value("i", epoch)
        self._unreadable = multiprocessing.Array("b", len(unreadable), lock=False)
        self._unreadable[:] = unreadable

    @property
    def unreadable_mask(self):
        """A bool array, one entry per row: True where the image could not be decoded (rows read so far)."""
        return np.frombuffer(self._unreadable, dtype=np.int8)[: len(self.dataset)].astype(bool)

    @property
    def epoch(self):
        return self._epoch.value

    def set_epoch(self, epoch):
        self._epoch.value = int(epoch)

    def __len__(self):
        return len(self.dataset)

    def row_seeds(self, index):
        """`(augmentation seed, mask seed)` of row `index` in the current epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        return int(state[0]), int(state[1])

    def __getitems__(self, indices):
        indices = [int(i) for i in indices]
        columns = self.dataset[indices]
        rows = []
        for position, index in enumerate(indices):
            augmentation_seed, mask_seed = self.row_seeds(index)
            self.transform.rng = random.Random(augmentation_seed)
            example = {name: values[position] for name, values in columns.items()}
            row, error = self.transform.transform_row(example, mask_seed)
            if error is not None and not self._unreadable[index]:
                self._unreadable[index] = 1
                path = cell_path(example[self.transform.image_column])
                report_skipped_image(f"{self.split} row {index}" + (f", {path}" if path else ""), error)
            rows.append(row)
        return rows

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def batch(self, indices):
        """Rows `indices` collated into model inputs (rows whose image cannot be decoded dropped)."""
        return collate_fn(self.__getitems__(indices))


# The name of hf_simmim 0.1, when the class served pretraining only.
SimMIMPretrainingDataset = SeededImageDataset
