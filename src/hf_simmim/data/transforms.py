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
with its row or file and the reason, and counted, and never stops a run (`SeededImageDataset` says how); any other
error (in augmentation, conversion, masking) is a bug and stops the run with its traceback.
"""

import multiprocessing
import random

import numpy as np
import torch

from ..models.image_transforms import (
    map_channels,
    rescale_and_normalize,
    resize_center_crop,
    to_normalized_array,
    to_rgb,
)
from ..models.masking import evaluation_patch_mask, snap_mask_to_patches
from .augmentation import pretraining_augmentation, random_erasing
from .device_augmentation import device_augmentation_problem
from .image_ops import (
    UndecodableImage,
    cell_path,
    decode_image,
    load_pixels,
    open_image,
    report_skipped_image,
    row_location,
    to_uint8_array,
)
from .loading import undecoded
from .pixels import read_pixels
from .user_masks import check_mask_size, check_user_masks, read_user_mask


class SimMIMTransform:
    """Batch function for `Dataset.set_transform` / `with_transform` / `map(batched=True)`.

    Adds `pixel_values` (float32 CHW, normalised; or uint8, see `uint8`) and `bool_masked_pos` (bool `(g, g)`) per
    row and keeps the columns named in `keep_columns` (e.g. `label`). An image that cannot be decoded yields
    `pixel_values=None` and a warning naming it (file, or position in the batch), and `collate_fn` drops the row;
    any other error propagates.

    Images become 8-bit RGB when the processor converts to RGB (`converts_to_rgb`: a 3-channel model reading
    images); otherwise each keeps its own channels at its precision (`data.pixels`: grayscale, 16-bit, `.npy` and
    array cells, multi-band TIFF), rescaled by the processor's `rescale_factor` and normalised with its per-channel
    mean and std.

    Args:
        image_processor: a `SimMIMImageProcessor` (image size, evaluation crop, channels, normalisation, masks).
        train: apply `augmentation`; otherwise the processor's resize + centre crop.
        augmentation: an `AugmentationPreset` (default: the official pretraining one at the processor's size).
        image_column: the column holding images.
        with_mask: add `bool_masked_pos` (pretraining); off for classification.
        mask_seed: fixed masks: with `map(..., with_indices=True)` each row's mask is seeded by (mask_seed, index),
            so it does not depend on batching or order.
        mask_column: the column of user masks (the processor's `mask_strategy` must be "user"): each row's mask
            image or array, of its image's size, nonzero = masked, cropped and flipped with the image and snapped
            to the patch grid (`models.masking.snap_mask_to_patches`).
        rng: a `random.Random` for the augmentation (default: the `random` module, which torch seeds per worker).
        uint8: give RGB `pixel_values` as uint8 CHW, not normalised: 4x less to copy between DataLoader workers, into
            pinned memory and to the GPU, and no float work per image on the CPU. The batch is normalised where
            it is used (`normalize_pixel_batch`; `SimMIMTrainer` does it on the device). Not with random erasing,
            which works on normalised pixels. Images that keep their own channels are always given normalised.
        device_crop: training rows hold the whole image (uint8 CHW, decoded at full size), its `crop_box` (left,
            top, right, bottom) and `flip`, drawn as `augmentation` draws them (the same draws from the same rng),
            for `device_augmentation.DeviceAugmentation` to crop, resize and flip the batch on its device. Needs
            `uint8`, RGB photos, a preset the device does (resized crop and flip) and no user masks; images must
            share one size to make a batch.
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
        mask_column=None,
        device_crop=False,
    ):
        self.processor = image_processor
        self.rgb = image_processor.converts_to_rgb
        self.train = train
        self.image_column = image_column
        self.with_mask = with_mask
        self.mask_seed = mask_seed
        self.mask_column = mask_column if with_mask else None
        self.keep_columns = tuple(keep_columns)
        self.rng = rng if rng is not None else random
        self.uint8 = uint8 and self.rgb
        self.augmentation = augmentation or pretraining_augmentation(image_processor.image_size)
        check_user_masks(image_processor.mask_strategy if with_mask else None, self.mask_column)
        self.mask_generator = image_processor.mask_generator(seed=mask_seed) if with_mask and not mask_column else None
        if augmentation is not None and augmentation.image_size != image_processor.image_size:
            raise ValueError(
                f"The augmentation crops to {augmentation.image_size} px but the image processor gives "
                f"{image_processor.image_size} px: build both from the same model config."
            )
        if train:
            self.augmentation.check_input(rgb=self.rgb, with_mask=self.mask_column is not None)
        if self.uint8 and train and self.augmentation.random_erasing:
            raise ValueError("uint8=True cannot be combined with random erasing (it needs normalised pixels).")
        self.device_crop = device_crop and train
        if self.device_crop:
            problem = device_augmentation_problem(self.augmentation, self.rgb, self.mask_column)
            if problem or not self.uint8:
                raise ValueError(
                    f"device_crop=True cannot crop these images on the device: {problem or 'it needs uint8=True'}. "
                    "Use --augmentation_device cpu."
                )

    def image_to_array(self, cell, mask_cell=None):
        """A dataset cell -> CHW array; with `mask_cell` (a user mask), `(array, (g, g) patch mask)`. Raises
        `UndecodableImage` (only) when the cell's image cannot be decoded; training decodes inside the crop
        (`AugmentationPreset.augment`), so a JPEG can be decoded at reduced scale."""
        mask = None if mask_cell is None else read_user_mask(mask_cell)
        image, mask = self._rgb_view(cell, mask) if self.rgb else self._channels_view(cell, mask)
        p = self.processor
        if self.uint8:
            array = to_uint8_array(image)
        elif self.rgb:
            array = to_normalized_array(image, p.image_mean, p.image_std)
        else:
            array = rescale_and_normalize(image, p.rescale_factor, p.image_mean, p.image_std)
        if self.train and self.augmentation.random_erasing:
            array = random_erasing(array, self.augmentation.random_erasing, self.rng)
        if mask_cell is None:
            return array
        return array, mask

    def uncropped_image(self, cell):
        """A dataset cell -> `(uint8 CHW array of the whole image, {"crop_box": ..., "flip": ...})`, the geometry drawn
        first, as `AugmentationPreset.augment` draws it. Raises `UndecodableImage` when the image cannot be decoded."""
        image = open_image(cell)
        crop, flip = self.augmentation.draw_geometry(*image.size, self.rng)
        array = to_uint8_array(to_rgb(load_pixels(image)))
        return array, {"crop_box": np.asarray(crop, dtype=np.int64), "flip": flip}

    def _rgb_view(self, cell, mask):
        """`(RGB PIL image at the model's size, its patch mask or None)`: augmented, or resized and centre-cropped."""
        p = self.processor
        if self.train:
            return self._augment(open_image(cell), mask)
        image = to_rgb(decode_image(cell))
        check_mask_size(mask, image.width, image.height)
        return resize_center_crop(image, p.image_size, p.crop_pct, p.resample), self._evaluation_mask(mask)

    def _channels_view(self, cell, mask):
        """`(CHW array at the model's size in the image's own units, its patch mask or None)`."""
        p = self.processor
        pixels = read_pixels(cell, p.num_channels)
        if pixels.shape[0] != p.num_channels:
            raise ValueError(
                f"{cell_path(cell) or 'an image'} has {pixels.shape[0]} channel(s) but the model takes "
                f"num_channels={p.num_channels}."
            )
        if self.train:
            return self._augment(pixels, mask)
        check_mask_size(mask, pixels.shape[2], pixels.shape[1])
        return self._resize_crop(pixels, p.resample), self._evaluation_mask(mask)

    def _augment(self, image, mask):
        if mask is None:
            return self.augmentation.augment(image, self.rng), None
        image, mask = self.augmentation.augment(image, self.rng, mask=mask)
        return image, snap_mask_to_patches(mask, self.processor.patch_size)

    def _resize_crop(self, pixels, resample):
        p = self.processor
        return map_channels(pixels, lambda channel: resize_center_crop(channel, p.image_size, p.crop_pct, resample))

    def _evaluation_mask(self, mask):
        """The user mask (or None) as the evaluation view's patch mask, the image processor's `masks=` rule."""
        p = self.processor
        return None if mask is None else evaluation_patch_mask(mask, p.image_size, p.patch_size, p.crop_pct)

    def _mask(self, index):
        if self.mask_seed is not None and index is not None:
            return self.mask_generator(generator=torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(index)))
        return self.mask_generator()

    def transform_row(self, example, mask_index=None):
        """One row (column -> value) -> `(output row, error)`: the output holds `pixel_values` (None when the image
        cannot be decoded; `error` is then that `UndecodableImage`, else None), `bool_masked_pos` (the row's user
        mask, or drawn, seeded by `mask_index` with `mask_seed`) and the kept columns."""
        error, user_mask, geometry = None, None, {}
        try:
            if self.device_crop:
                pixel_values, geometry = self.uncropped_image(example[self.image_column])
            elif self.mask_column:
                pixel_values, user_mask = self.image_to_array(example[self.image_column], example[self.mask_column])
            else:
                pixel_values = self.image_to_array(example[self.image_column])
        except UndecodableImage as undecodable:
            pixel_values, error = None, undecodable
        output = {"pixel_values": pixel_values, **geometry}
        if self.with_mask:
            output["bool_masked_pos"] = user_mask if self.mask_column else self._mask(mask_index)
        output.update({column: example[column] for column in self.keep_columns if column in example})
        return output, error

    def require_image_column(self, columns):
        """Refuse columns without the image column (or the mask column, with user masks)."""
        for column, what, flag in ((self.image_column, "image", "--image_column_name"),
                                   (self.mask_column, "mask", "--mask_column")):
            if column is not None and column not in columns:
                raise KeyError(
                    f"{what} column {column!r} is not in the dataset (columns: {sorted(columns)}): pass the right "
                    f"column name ({flag})."
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


def collate_fn(examples):
    """Rows from `SimMIMTransform` -> a batch of tensors; rows whose image could not be read are dropped.
    `pixel_values` stay uint8 when the transform gave uint8 (`SimMIMTransform(uint8=True)`), else float32; rows of
    `SimMIMTransform(device_crop=True)` add `crop_box` (int64 `(B, 4)`) and `flip` (bool `(B,)`)."""
    rows = [row for row in examples if row.get("pixel_values") is not None]
    if not rows:
        raise ValueError("No image of this batch could be decoded; check the dataset's image column.")
    arrays = [np.asarray(r["pixel_values"]) for r in rows]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        shown = " and ".join("x".join(map(str, shape)) for shape in shapes[:2])
        fix = (
            "uncropped images (--augmentation_device accelerator) must all have one size: use --augmentation_device "
            "cpu, or resize the images to one size" if "crop_box" in rows[0]
            else "the transform must give every row the model's channels and size"
        )
        raise ValueError(f"This batch holds pixel arrays of different shapes ({shown}, channels x height x width): {fix}.")
    dtype = torch.uint8 if all(a.dtype == np.uint8 for a in arrays) else torch.float32
    batch = {"pixel_values": torch.stack([torch.as_tensor(a, dtype=dtype) for a in arrays])}
    if "bool_masked_pos" in rows[0]:
        batch["bool_masked_pos"] = torch.stack([torch.as_tensor(np.asarray(r["bool_masked_pos"])).bool() for r in rows])
    if "crop_box" in rows[0]:
        batch["crop_box"] = torch.as_tensor(np.stack([r["crop_box"] for r in rows]))
        batch["flip"] = torch.as_tensor([bool(r["flip"]) for r in rows])
    for key in ("label", "labels"):
        if key in rows[0]:
            batch["labels"] = torch.as_tensor([r[key] for r in rows])
    return batch


def seeded_per_sample(transform):
    """`transform` set up for `seeded_sample`: its masks drawn from a seed given per sample."""
    if transform.with_mask and transform.mask_seed is None:
        transform.mask_seed = 0  # masks come from each sample's seeds: one seeded generator per sample
    transform.rng = random.Random(0)  # replaced per sample; the `random` module would not pickle to workers
    return transform


def seeded_sample(transform, example, seed_words):
    """`example` through `transform` (`seeded_per_sample`) with its random crop, flip and mask drawn from
    `numpy.random.SeedSequence(seed_words)` instead of a global random stream: `(sample, error)` as
    `SimMIMTransform.transform_row` gives them."""
    augmentation_seed, mask_seed = (int(value) for value in np.random.SeedSequence(seed_words).generate_state(2))
    transform.rng = random.Random(augmentation_seed)
    return transform.transform_row(example, mask_seed)


class SeededImageDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` served to the `Trainer` through `SimMIMTransform` (pretraining or fine-tuning, training
    or evaluation), with the random crop, flip and mask of each row drawn from `(seed, epoch, row)` instead of a
    global random stream.

    So a row's sample does not depend on batch size, number of processes, DataLoader workers or prefetching: a
    run resumed from a checkpoint sees exactly the data of an uninterrupted run, and 2 processes x batch b see
    the batches of 1 process x batch 2b. A fresh crop and mask is still drawn every epoch: the Trainer's
    `EpochCallback` calls `set_epoch`.

    An image that cannot be decoded never stops the run, and is reported once and counted once:
    - rows whose image header cannot be read, found by `checks.check_image_dataset` before training (which reports
      them), are given as `unreadable_rows` and left out: the dataset's length counts the other rows, so an epoch
      is one pass over them;
    - a row whose header reads but whose pixels do not decode (a truncated file) is found when first read, which
      reports it (split, row, file, reason) and flags it. That read and every later one are served the next row
      (in dataset order, wrapping around) whose image decodes, drawn with the seeds of the row it stands in for: a
      batch keeps its size, even a batch of one.
    `unreadable_mask` flags both kinds, one entry per row of `dataset`, from construction on: counts never depend on
    how much of the data a run read.

    The epoch and the flags live in shared memory, which DataLoader workers use directly, forked or spawned (a
    spawned worker is handed the shared memory, not a copy). Each process of a distributed run has its own flags:
    `training.trainer.count_unreadable_images` merges them (an image counts once however many processes flagged
    it), but an image whose pixels fail at read time is reported by each process that reads it.

    Args:
        dataset: a `datasets.Dataset` (its image column is read undecoded, so that a bad image reaches the
            transform instead of failing inside `datasets`).
        transform: a `SimMIMTransform` (train or eval); it is called one row at a time with its own seeds.
        seed: the run's seed.
        split: the split's name in the reports ("train", "validation").
        unreadable_rows: the rows `check_image_dataset` found unreadable (already reported).
    """

    def __init__(self, dataset, transform, seed=0, split="train", unreadable_rows=()):
        transform.require_image_column(dataset.column_names)
        self.dataset = undecoded(dataset, transform.image_column, transform.mask_column)
        self.transform = seeded_per_sample(transform)
        self.seed = int(seed)
        self.split = split
        # shared memory, so that DataLoader workers see the epoch and set the same bad-row flags. No lock: only the
        # main process sets the epoch, a flag only ever goes from 0 to 1, and a lock would not go to spawned workers
        self._epoch = multiprocessing.Value("i", 0, lock=False)
        self._unreadable = multiprocessing.Array("b", max(len(self.dataset), 1), lock=False)
        for row in unreadable_rows:
            self._unreadable[row] = 1
        self.rows = np.flatnonzero(~self.unreadable_mask)  # position in this dataset -> row of `dataset`

    def with_transform(self, transform, seed):
        """The same rows served through `transform` and `seed` (e.g. the training rows as evaluation crops, for
        pictures), under the same split name and sharing the unreadable flags: a bad image found through either
        is reported and counted once."""
        view = SeededImageDataset(self.dataset, transform, seed, self.split)
        view._unreadable, view.rows = self._unreadable, self.rows  # the flags shared, not the view's fresh ones
        return view

    def __getstate__(self):
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            # a copy, not a process being spawned: shared memory can only be handed to the latter
            state["_epoch"], state["_unreadable"] = self.epoch, bytes(self._unreadable)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if isinstance(self._epoch, int):  # a copy: its own shared memory, holding the copied values
            self._epoch = multiprocessing.Value("i", self._epoch, lock=False)
            flags = self._unreadable
            self._unreadable = multiprocessing.Array("b", len(flags), lock=False)
            self._unreadable[:] = flags

    @property
    def unreadable_mask(self):
        """A bool array, one entry per row of `dataset`: True where the image cannot be decoded (found by the
        header check, or by a read so far)."""
        return np.frombuffer(self._unreadable, dtype=np.int8)[: len(self.dataset)].astype(bool)

    @property
    def epoch(self):
        return self._epoch.value

    def set_epoch(self, epoch):
        self._epoch.value = int(epoch)

    def __len__(self):
        return len(self.rows)


    def __getitems__(self, positions):
        positions = [int(p) for p in positions]
        rows = [int(self.rows[p]) for p in positions]
        columns = self.dataset[rows]
        samples = []
        for i, (position, row) in enumerate(zip(positions, rows)):
            sample = None
            if not self._unreadable[row]:
                sample = self._sample({name: values[i] for name, values in columns.items()}, row, row)
            samples.append(sample if sample is not None else self._stand_in(position, row))
        return samples

    def _sample(self, example, row, seeds_row):
        """`example` (row `row`) through the transform with the seeds of row `seeds_row`; None if its image cannot
        be decoded, which is then reported and flagged."""
        sample, error = seeded_sample(self.transform, example, [self.seed, self.epoch, int(seeds_row)])
        if error is not None:
            self._unreadable[row] = 1
            report_skipped_image(row_location(row, example[self.transform.image_column], self.split), error)
        return sample if error is None else None

    def _stand_in(self, position, seeds_row):
        """The sample of the first row after `position` whose image decodes, drawn with the seeds of `seeds_row`."""
        for offset in range(1, len(self.rows)):
            row = int(self.rows[(position + offset) % len(self.rows)])
            if not self._unreadable[row]:
                sample = self._sample(self.dataset[row], row, seeds_row)
                if sample is not None:
                    return sample
        raise ValueError(
            f"No image of the {self.split} split can be decoded (column {self.transform.image_column!r}): check that "
            "the column holds images (PNG/JPEG bytes, paths or PIL images)."
        )

    def __getitem__(self, position):
        return self.__getitems__([position])[0]

    def batch(self, positions):
        """Rows at `positions` collated into model inputs."""
        return collate_fn(self.__getitems__(positions))


# The name of hf_simmim 0.1, when the class served pretraining only.
SimMIMPretrainingDataset = SeededImageDataset
