"""Datasets for a run: a hub dataset, a folder of images, Parquet/Arrow files or WebDataset `.tar` shards, or the
sample bundled with the package, each as a `Dataset` or (`streaming=True`) an `IterableDataset`; the image column;
labels and class-balanced subsets for fine-tuning."""

import os
from pathlib import Path

import numpy as np

SAMPLE_DATA_DIR = Path(__file__).resolve().parents[1] / "sample_data"
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "picture", "photo", "pixel_values")
DATA_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
# A local folder streamed (`load_local_dataset(streaming=True)`) is indexed, then served as this many shards (or one
# per image when fewer): a power of two, so that any power-of-two number of processes and workers shares them evenly.
FOLDER_STREAM_SHARDS = 256
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def bundled_sample_data_files():
    """The sample shipped with the package (640 train / 200 test CIFAR-10 images), as `data_files`."""
    return {"train": str(SAMPLE_DATA_DIR / "train.parquet"), "validation": str(SAMPLE_DATA_DIR / "test.parquet")}


def _data_files_format(files):
    formats = {DATA_FILE_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) != 1:
        raise ValueError(
            f"Cannot tell the format of {', '.join(files)}: give Parquet (.parquet), Arrow (.arrow) or WebDataset "
            "(.tar) files of one kind, or a folder of images (imagefolder)."
        )
    return formats.pop()


def _files_by_split(path, files):
    """The data `files` found at `path` grouped by the split their names say, by datasets' own patterns
    (`train-00000-of-00004.parquet`, `validation-*`, `test.parquet`, ...); all in "train" when `path` is not a folder
    or some file's name says no split."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if not os.path.isdir(path):
        return {"train": files}
    found = {os.path.abspath(f) for f in files}
    resolved = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
    by_split = {
        str(split): sorted(f for f in map(os.path.abspath, names) if f in found) for split, names in resolved.items()
    }
    by_split = {split: names for split, names in by_split.items() if names}
    return by_split if sum(map(len, by_split.values())) == len(found) else {"train": files}


def _local_files(path):
    """Files of a supported data format at `path`: a file, a glob, or a folder holding such files."""
    import glob

    if os.path.isdir(path):
        found = []
        for suffix in DATA_FILE_FORMATS:
            found += sorted(glob.glob(os.path.join(path, "**", f"*{suffix}"), recursive=True))
        return found
    return sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else ([path] if os.path.isfile(path) else [])


def numpy_folder_dataset(path, files):
    """A folder of NumPy `.npy` files (`files`) -> `DatasetDict` with an `image` column of their paths, read as
    `imagefolder` reads a folder of images: first-level folders named train / validation / valid / val / test
    are splits, and when every file lies in a subfolder (of its split), the subfolder names are the classes of a
    `label` column (sorted, as `ClassLabel` names)."""
    import datasets

    parts = [Path(file).relative_to(path).parts for file in files]
    by_split = all(len(p) > 1 and p[0] in ("train", *VALIDATION_SPLIT_NAMES) for p in parts)
    splits = {}
    for file, part in zip(files, parts):
        splits.setdefault(part[0] if by_split else "train", []).append((file, part[1:] if by_split else part))
    labelled = all(len(part) > 1 for rows in splits.values() for _, part in rows)
    features = {"image": datasets.Value("string")}
    if labelled:
        names = sorted({part[-2] for rows in splits.values() for _, part in rows})
        features["label"] = datasets.ClassLabel(names=names)
    columns = {
        split: {"image": [f for f, _ in rows], **({"label": [names.index(p[-2]) for _, p in rows]} if labelled else {})}
        for split, rows in splits.items()
    }
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(data, features=datasets.Features(features)) for split, data in columns.items()}
    )


def _numpy_files(path):
    """The `.npy` files of a folder (recursively), refusing a folder that also holds images, which `imagefolder`
    would read while leaving the arrays out."""
    import glob

    arrays = sorted(glob.glob(os.path.join(path, "**", "*.npy"), recursive=True))
    if arrays:
        images = [f for f in glob.glob(os.path.join(path, "**", "*.*"), recursive=True)
                  if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if images:
            raise ValueError(
                f"{path!r} holds both .npy arrays and images (e.g. {images[0]}): keep one kind per folder."
            )
    return arrays


def load_local_dataset(path, cache_dir=None, streaming=False):
    """A local source -> `DatasetDict` (`streaming=True`: `IterableDatasetDict`): Parquet/Arrow/WebDataset file(s)
    (a file, a glob, or a folder of them, whose file names may say their split: `_files_by_split`), a folder of
    NumPy `.npy` files (`numpy_folder_dataset`), or a folder of images (`imagefolder`: class subfolders become the
    `label` column). A folder streamed is indexed first (paths only), then served as `FOLDER_STREAM_SHARDS` shards,
    so that processes and DataLoader workers share it."""
    import datasets

    files = _local_files(str(path))
    try:
        if files:
            return datasets.load_dataset(
                _data_files_format(files), data_files=_files_by_split(str(path), files), cache_dir=cache_dir,
                streaming=streaming,
            )
        if os.path.isdir(path):
            arrays = _numpy_files(str(path))
            if arrays:
                folder = numpy_folder_dataset(str(path), arrays)
            else:
                folder = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
            return _as_stream(folder) if streaming else folder
    except (ValueError, FileNotFoundError) as error:
        if "corresponds to no data" in str(error) or "doesn't contain any data" in str(error):
            raise ValueError(
                f"The train split is empty: {path!r} holds no images or rows. Check the data path."
            ) from error
        raise
    raise FileNotFoundError(
        f"{path!r} is neither a folder of images nor Parquet/Arrow/WebDataset file(s) nor a folder of .npy arrays: "
        "check the path (globs like 'data/train-*.parquet' are accepted)."
    )


def _as_stream(dataset_dict):
    import datasets

    return datasets.IterableDatasetDict({
        split: dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), FOLDER_STREAM_SHARDS)))
        for split, dataset in dataset_dict.items()
    })


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
    streaming=False,
):
    """The train and validation datasets of a run, from (first that applies):

    - `dataset_name`: a dataset on the Hugging Face hub (with `dataset_config_name`), or a local path;
    - `train_dir` (and `validation_dir`): a folder of images, or Parquet/Arrow/WebDataset file(s);
    - nothing: the sample bundled with the package (no network needed).

    The validation set is the source's `validation`/`valid`/`val`/`test` split or `validation_dir`; otherwise a
    `validation_split_percentage` share of the training set, split with `seed` (the same in every process).
    Returns `(train, validation)`; `validation` is `None` when there is none. `streaming=True`: both are
    `IterableDataset`s, read as they are iterated, and nothing is held out of a stream (it has no length).
    """
    import datasets

    if dataset_name is not None and train_dir is not None:
        raise ValueError("Give either dataset_name or train_dir, not both.")
    if dataset_name is not None:
        if os.path.exists(dataset_name) or any(ch in dataset_name for ch in "*?["):
            source = load_local_dataset(dataset_name, cache_dir, streaming)
        else:
            source = datasets.load_dataset(
                dataset_name, dataset_config_name, cache_dir=cache_dir, token=token, streaming=streaming
            )
    elif train_dir is not None:
        source = load_local_dataset(train_dir, cache_dir, streaming)
    else:
        source = datasets.load_dataset(
            "parquet", data_files=bundled_sample_data_files(), cache_dir=cache_dir, streaming=streaming
        )

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        source = {"train": source}
    train = _split(source, ("train",))
    if train is None:
        if len(source) != 1:
            raise ValueError(f"The dataset has no 'train' split (splits: {sorted(source)}): name one 'train'.")
        train = next(iter(source.values()))
    validation = _split(source, VALIDATION_SPLIT_NAMES)
    if validation_dir is not None:
        validation_source = load_local_dataset(validation_dir, cache_dir, streaming)
        validation = next(iter(validation_source.values()))
    if validation is None and validation_split_percentage and not streaming and len(train) >= 2:
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


def undecoded(dataset, image_column, mask_column=None):
    """`dataset` with its image column (and user-mask column) as the data path reads them: images left as
    bytes/paths (`datasets.Image(decode=False)`), so an unreadable image reaches `SimMIMTransform` (which skips and
    counts it) instead of failing inside `datasets`; an image column of arrays (`Array2D`/`Array3D`, lists of
    lists) as NumPy arrays of their own pixel type, where `datasets` would give nested lists (or int64 arrays). A
    mask column of arrays stays lists: only which pixels are nonzero counts."""
    import datasets

    for column in (image_column, mask_column):
        feature = dataset.features.get(column) if column else None
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    dtype = array_dtype(dataset.features.get(image_column))
    if dtype is not None:
        return dataset.with_format("numpy", columns=[image_column], output_all_columns=True, dtype=dtype)
    return dataset


def array_dtype(feature):
    """The NumPy pixel type of an array feature (`Array2D`..`Array5D`, or lists of lists of a numeric `Value`),
    else None."""
    if hasattr(feature, "shape") and hasattr(feature, "dtype"):
        return np.dtype(feature.dtype)
    depth = 0
    while hasattr(feature, "feature"):
        feature, depth = feature.feature, depth + 1
    dtype = getattr(feature, "dtype", None) if depth >= 2 else None
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return None
    return dtype if dtype is not None and (np.issubdtype(dtype, np.number) or dtype == bool) else None


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
