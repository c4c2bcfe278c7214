"""From a dataset row to a model batch: decode and convert the image, augment (or centre-crop), normalise, draw a
SimMIM mask, and collate.

`SimMIMTransform` works both ways `datasets` applies functions:

    train = dataset.with_transform(SimMIMTransform(processor, train=True))      # fresh crop and mask every read
    evals = dataset.map(SimMIMTransform(processor, train=False, mask_seed=0),     # fixed masks, reproducible
                        batched=True, with_indices=True, remove_columns=dataset.column_names)

and `collate_fn` stacks its rows into `pixel_values` / `bool_masked_pos` (/ `labels`) tensors.

For a training run (the second half of this file): `load_image_datasets` (hub dataset, image folder, Parquet/Arrow
files, or the bundled sample), `detect_image_column`, `check_image_dataset` (refuses empty splits, a missing column,
images smaller than the mask patch, before training starts), and `SimMIMPretrainingDataset`, which serves a dataset
to the `Trainer` with crops and masks drawn per (seed, epoch, row): exact resumption, and the same batches whatever
the number of processes.
"""

import io
import logging
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augmentation import RandAugment, random_erasing
from .image_transforms import (
    normalization_coefficients,
    random_horizontal_flip,
    random_resized_crop,
    resize_center_crop,
    to_normalized_array,
    to_rgb,
    to_uint8_array,
)

logger = logging.getLogger(__name__)


def decode_image(value, lazy=False):
    """A dataset cell -> PIL image: a PIL image, `{"bytes": ..., "path": ...}` (an undecoded `datasets.Image`),
    raw bytes, or a file path. Decoded at once (a truncated file fails here), unless `lazy`: then only the header
    is read, so the training crop can have a JPEG decoded at reduced scale (`reduce_on_decode`)."""
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
    if not lazy:
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

    Adds `pixel_values` (float32 CHW, normalised; or uint8, see `uint8`) and `bool_masked_pos` (bool `(g, g)`) per
    row and keeps the columns named in `keep_columns` (e.g. `label`). An image that cannot be decoded yields
    `pixel_values=None`, is logged and counted, and `collate_fn` drops the row.

    Args:
        image_processor: a `SimMIMImageProcessor` (image size, normalisation, mask and augmentation settings).
        train: the paper's RandomResizedCrop + horizontal flip (then the processor's `rand_augment` and
            `random_erasing`, set for fine-tuning); otherwise resize + centre crop.
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
        skipped=None,
        uint8=False,
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
        self.uint8 = uint8
        if uint8 and train and getattr(image_processor, "random_erasing", 0.0):
            raise ValueError("uint8=True cannot be combined with random erasing (it needs normalised pixels).")

    def image_to_array(self, image):
        p = self.processor
        if self.train:
            image = random_resized_crop(
                image, p.image_size, tuple(p.crop_scale), tuple(p.crop_ratio), self.rng, p.train_resample
            )
            image = random_horizontal_flip(image, p.hflip_prob, self.rng)
            if getattr(p, "rand_augment", None):
                image = self._rand_augment(p.rand_augment)(image, self.rng)
        else:
            image = resize_center_crop(to_rgb(image), p.image_size, p.crop_pct, p.resample)
        if self.uint8:
            return to_uint8_array(image)
        array = to_normalized_array(image, p.image_mean, p.image_std)
        return random_erasing(array, getattr(p, "random_erasing", 0.0), self.rng) if self.train else array

    def _rand_augment(self, spec):
        if getattr(self, "_policy", None) is None or self._policy.spec != spec:
            self._policy = RandAugment(spec)
        return self._policy

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
                array = self.image_to_array(decode_image(cell, lazy=self.train))
            except Exception as error:  # a corrupt or unreadable image must never stop an epoch
                self.skipped.add()
                where = cell.get("path") if isinstance(cell, dict) and cell.get("path") else f"batch position {position}"
                logger.warning("Skipping an unreadable image (%s; %s: %s).", where, type(error).__name__, str(error)[:200])
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
    """Rows from `SimMIMTransform` -> a batch of tensors; rows whose image could not be read are dropped.
    `pixel_values` stay uint8 when the transform gave uint8 (`SimMIMTransform(uint8=True)`), else float32."""
    rows = [row for row in examples if row.get("pixel_values") is not None]
    if not rows:
        raise ValueError("Every image in this batch was unreadable; check the dataset's image column.")
    arrays = [np.asarray(r["pixel_values"]) for r in rows]
    dtype = torch.uint8 if all(a.dtype == np.uint8 for a in arrays) else torch.float32
    batch = {"pixel_values": torch.stack([torch.as_tensor(a, dtype=dtype) for a in arrays])}
    if "bool_masked_pos" in rows[0]:
        batch["bool_masked_pos"] = torch.stack([torch.as_tensor(np.asarray(r["bool_masked_pos"])).bool() for r in rows])
    for key in ("label", "labels"):
        if key in rows[0]:
            batch["labels"] = torch.as_tensor([r[key] for r in rows])
    return batch


def normalize_pixel_batch(pixel_values, image_mean, image_std):
    """A uint8 `(B, 3, H, W)` batch (from `SimMIMTransform(uint8=True)`) -> float32 `(x / 255 - mean) / std`, on
    the batch's device, computed as `to_normalized_array` does (`x * a + b`); a float batch is returned as is."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    a, b = normalization_coefficients(image_mean, image_std)
    a = torch.as_tensor(a, device=pixel_values.device).view(1, -1, 1, 1)
    b = torch.as_tensor(b, device=pixel_values.device).view(1, -1, 1, 1)
    return pixel_values.float().mul_(a).add_(b)


# ================================================================================================================
# Loading a dataset for a run, checking it before training, and serving it to the Trainer
# ================================================================================================================
SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample_data"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture", "photo", "pixel_values")
DATA_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")


def bundled_sample_data_files():
    """The sample shipped with the package (640 train / 200 test CIFAR-10 images), as `data_files`."""
    return {"train": str(SAMPLE_DATA_DIR / "train.parquet"), "validation": str(SAMPLE_DATA_DIR / "test.parquet")}


def _data_files_format(files):
    formats = {DATA_FILE_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"Cannot tell the format of {', '.join(files)}: give Parquet (.parquet) or Arrow (.arrow) files of one "
            "kind, or a folder of images (imagefolder)."
        )
    return formats.pop()


def _local_files(path):
    """Files of a supported data format at `path`: a file, a glob, or a folder holding such files."""
    import glob

    if os.path.isdir(path):
        found = []
        for suffix in DATA_FILE_FORMATS:
            found += sorted(glob.glob(os.path.join(path, "**", f"*{suffix}"), recursive=True))
        return found
    return sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else ([path] if os.path.isfile(path) else [])


def load_local_dataset(path, cache_dir=None):
    """A local source -> `DatasetDict`: Parquet/Arrow file(s) (a file, a glob, or a folder of them), or a folder
    of images (`imagefolder`: class subfolders become the `label` column)."""
    import datasets

    files = _local_files(str(path))
    try:
        if files:
            return datasets.load_dataset(_data_files_format(files), data_files={"train": files}, cache_dir=cache_dir)
        if os.path.isdir(path):
            return datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
    except (ValueError, FileNotFoundError) as error:
        if "corresponds to no data" in str(error) or "doesn't contain any data" in str(error):
            raise ValueError(
                f"The train split is empty: {path!r} holds no images or rows. Check the data path."
            ) from error
        raise
    raise FileNotFoundError(
        f"{path!r} is neither a folder of images nor Parquet/Arrow file(s): check the path (globs like "
        "'data/train-*.parquet' are accepted)."
    )


def _split(dataset_dict, names):
    for name in names:
        if name in dataset_dict:
            return dataset_dict[name]
    return None


def load_image_datasets(
    dataset_name=None,
    dataset_config_name=None,
    train_dir=None,
    validation_dir=None,
    validation_split_percentage=5.0,
    seed=42,
    cache_dir=None,
    token=None,
):
    """The train and validation datasets of a run, from (first that applies):

    - `dataset_name`: a dataset on the Hugging Face hub (with `dataset_config_name`), or a local path;
    - `train_dir` (and `validation_dir`): a folder of images, or Parquet/Arrow file(s);
    - nothing: the sample bundled with the package (no network needed).

    The validation set is the source's `validation`/`valid`/`val`/`test` split or `validation_dir`; otherwise a
    `validation_split_percentage` share of the training set, split with `seed` (the same in every process).
    Returns `(train, validation)`; `validation` is `None` when there is none.
    """
    import datasets

    if dataset_name is not None and train_dir is not None:
        raise ValueError("Give either dataset_name or train_dir, not both.")
    if dataset_name is not None:
        if os.path.exists(dataset_name) or any(ch in dataset_name for ch in "*?["):
            source = load_local_dataset(dataset_name, cache_dir)
        else:
            source = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    elif train_dir is not None:
        source = load_local_dataset(train_dir, cache_dir)
    else:
        source = datasets.load_dataset("parquet", data_files=bundled_sample_data_files(), cache_dir=cache_dir)

    if isinstance(source, datasets.Dataset):
        source = datasets.DatasetDict({"train": source})
    train = _split(source, ("train",))
    if train is None:
        if len(source) != 1:
            raise ValueError(f"The dataset has no 'train' split (splits: {sorted(source)}): name one 'train'.")
        train = next(iter(source.values()))
    validation = _split(source, VALIDATION_SPLIT_NAMES)
    if validation_dir is not None:
        validation_source = load_local_dataset(validation_dir, cache_dir)
        validation = next(iter(validation_source.values()))
    if validation is None and validation_split_percentage and len(train) >= 2:
        count = max(1, int(round(len(train) * validation_split_percentage / 100.0)))
        if count < len(train):
            parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
            train, validation = parts["train"], parts["test"]
    return train, validation


def detect_image_column(dataset, image_column=None):
    """The column holding images: `image_column` if given (it must exist), else the first column of the
    `datasets.Image` type, else the first of `IMAGE_COLUMN_CANDIDATES`. Raises `ValueError` naming the columns."""
    import datasets

    columns = list(dataset.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(
                f"The image column {image_column!r} is not in the dataset; its columns are {columns}. Pass one of "
                "them with --image_column_name."
            )
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in columns:
            return name
    raise ValueError(
        f"No image column found among the dataset's columns {columns}: name it with --image_column_name."
    )


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


def undecoded(dataset, image_column):
    """`dataset` with its image column left as bytes/paths (`datasets.Image(decode=False)`), so an unreadable
    image reaches `SimMIMTransform` (which skips and counts it) instead of failing inside `datasets`."""
    import datasets

    feature = dataset.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


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


class SimMIMPretrainingDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` served to the `Trainer` through `SimMIMTransform`, with the random crop, flip and mask
    of each row drawn from `(seed, epoch, row index)` instead of a global random stream.

    So a row's sample does not depend on batch size, number of processes, DataLoader workers or prefetching: a
    run resumed from a checkpoint sees exactly the data of an uninterrupted run, and 2 processes x batch b see
    the batches of 1 process x batch 2b. A fresh crop and mask is still drawn every epoch: the Trainer's
    `EpochCallback` calls `set_epoch` (a shared value, so forked DataLoader workers see it too).

    Unreadable images are skipped (`SimMIMTransform` logs and counts each skip) and their rows remembered, so
    `unreadable_rows` counts each bad image once however many epochs read it.

    Args:
        dataset: a `datasets.Dataset` (its image column is read undecoded: unreadable images are skipped).
        transform: a `SimMIMTransform` (train or eval); it is called one row at a time with its own seeds.
        seed: the run's seed.
    """

    def __init__(self, dataset, transform, seed=0):
        self.dataset = undecoded(dataset, transform.image_column)
        self.transform = transform
        if transform.with_mask and transform.mask_seed is None:
            transform.mask_seed = 0  # masks come from `indices` below: one seeded generator per row
        self.seed = int(seed)
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
        """A bool array, one entry per row: True where the image could not be read (rows read so far)."""
        return np.frombuffer(self._unreadable, dtype=np.int8)[: len(self.dataset)].astype(bool)

    @property
    def unreadable_rows(self):
        return int(self.unreadable_mask.sum())

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
            row = {name: values[position : position + 1] for name, values in columns.items()}
            output = self.transform(row, indices=[mask_seed])
            if output["pixel_values"][0] is None:
                self._unreadable[index] = 1
            rows.append({name: values[0] for name, values in output.items()})
        return rows

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def batch(self, indices):
        """Rows `indices` collated into model inputs (unreadable rows dropped)."""
        return collate_fn(self.__getitems__(indices))


# ================================================================================================================
# Labels, for fine-tuning and evaluation
# ================================================================================================================
def label_names(dataset, label_column="label"):
    """Class names of `label_column`: the `ClassLabel` names, else `"0" ... "N-1"` for integer labels 0..N-1.
    Raises `ValueError` naming the column when it is missing or not integer labels."""
    import datasets

    if label_column not in dataset.column_names:
        raise ValueError(
            f"The label column {label_column!r} is not in the dataset; its columns are {list(dataset.column_names)}. "
            "Pass the right one with --label_column_name."
        )
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
        raise ValueError(
            f"The label column {label_column!r} holds {feature}, not integer class labels: cast it with "
            "`dataset.class_encode_column` or pass another --label_column_name."
        )
    labels = dataset.unique(label_column)
    if min(labels) < 0:
        raise ValueError(f"The label column {label_column!r} has negative labels: labels must be 0..num_classes-1.")
    return [str(i) for i in range(max(labels) + 1)]


def select_per_class(dataset, label_column="label", samples_per_class=None, fraction=None, seed=0):
    """A seeded, class-balanced subset for low-label experiments: `samples_per_class` rows of each class (all of
    a class that has fewer), or `fraction` of each class (at least one row). Neither given: `dataset` as it is."""
    if samples_per_class is None and fraction is None:
        return dataset
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        count = samples_per_class if samples_per_class is not None else max(1, int(round(fraction * len(rows))))
        chosen.append(rng.permutation(rows)[: min(count, len(rows))])
    return dataset.select(np.sort(np.concatenate(chosen)).tolist())
