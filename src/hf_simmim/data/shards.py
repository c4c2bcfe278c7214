"""A local image source written as Parquet shards for streaming (`hf-simmim shard DIR OUT --shard_size 512MB`).

The source is read as a run reads it (`loading.load_local_dataset`: a folder of images, with class subfolders as a
`label` column and split folders as splits; a folder of `.npy` files; Parquet/Arrow files), and each split is written
as shards `OUT/{split}-00000-of-0000N.parquet` of about `--shard_size` each (its rows shuffled first, unless
`--keep_order`), the files' bytes stored in them as `push_to_hub` stores them (`datasets.table.embed_table_storage`).
Image columns keep datasets' `Image` feature, so `load_dataset("parquet", data_dir=OUT, streaming=True)` decodes them; `.npy` arrays are stored as
`{"bytes", "path"}` cells, which `data.pixels` reads.
"""

import math
import os

from .loading import load_local_dataset

NPY_CELL = {"bytes": "binary", "path": "string"}


def npy_path_columns(dataset):
    """The columns of paths to `.npy` files (`loading.numpy_folder_dataset`)."""
    import datasets

    return [
        name for name, feature in dataset.features.items()
        if feature == datasets.Value("string") and len(dataset)
        and str(dataset.data.column(name)[0].as_py()).endswith(".npy")
    ]


def estimated_bytes(dataset):
    """What `dataset` will weigh in shards: its table, plus the files its cells name but do not hold (image cells
    with a path and no bytes, `.npy` paths)."""
    import datasets
    import pyarrow.compute as pc

    total = dataset.data.nbytes
    images = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    for column in images + npy_path_columns(dataset):
        cells = dataset.data.column(column)
        if column in images:  # datasets stores an image as {bytes, path}
            cells = pc.filter(pc.struct_field(cells, "path"), pc.is_null(pc.struct_field(cells, "bytes")))
        total += sum(os.path.getsize(path) for path in cells.to_pylist() if path)
    return total


def embedded(shard):
    """`shard` with the files its cells name stored in it: images by datasets' `embed_table_storage` (as
    `push_to_hub` does), `.npy` paths as `{"bytes", "path"}` cells (the file name kept, as for images)."""
    import datasets
    from datasets.table import embed_table_storage

    if any(isinstance(feature, datasets.Image) for feature in shard.features.values()):
        shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        shard = shard.with_format(None)
    for column in npy_path_columns(shard):
        features = shard.features.copy()
        features[column] = {key: datasets.Value(kind) for key, kind in NPY_CELL.items()}

        def read_files(batch, column=column):
            return {column: [{"bytes": _read(path), "path": os.path.basename(path)} for path in batch[column]]}

        shard = shard.map(read_files, batched=True, features=features, keep_in_memory=True)
    return shard


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


def write_shards(source, output_dir, max_shard_size="512MB", shuffle_seed=0, progress=True):
    """Write every split of the local `source` as Parquet shards of about `max_shard_size` (bytes, or a string such
    as "512MB") in `output_dir`, which must hold no Parquet file yet; returns the written paths, split by split.

    The rows are shuffled with `shuffle_seed` first (None: kept in the source's order), so that each shard mixes
    the whole split: a folder lists its images class by class, and a stream's shuffle buffer only mixes the few
    shards it reads at a time. `progress`: a progress bar over the images."""
    import datasets
    from datasets.utils.py_utils import convert_file_size_to_int
    from tqdm.auto import tqdm

    max_bytes = convert_file_size_to_int(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"--shard_size {max_shard_size!r}: give a positive size, e.g. 512MB.")
    if os.path.isdir(output_dir) and any(name.endswith(".parquet") for name in os.listdir(output_dir)):
        raise ValueError(f"{output_dir!r} holds Parquet files already: write the shards into an empty folder.")
    splits = load_local_dataset(source)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar over the images instead of one per shard and step
    try:
        for split, dataset in splits.items():
            count = max(1, min(len(dataset), math.ceil(estimated_bytes(dataset) / max_bytes)))
            if shuffle_seed is not None:
                dataset = dataset.shuffle(seed=shuffle_seed)
            with tqdm(total=len(dataset), unit="image", desc=f"{split}: {count} shard(s)", disable=not progress) as bar:
                for index in range(count):
                    shard = embedded(dataset.shard(count, index, contiguous=True))
                    path = os.path.join(output_dir, f"{split}-{index:05d}-of-{count:05d}.parquet")
                    shard.to_parquet(path)
                    written.append(path)
                    bar.update(len(shard))
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()
    return written
