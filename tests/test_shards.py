"""`hf-simmim shard DIR OUT`: a local folder written as Parquet shards that `load_dataset("parquet",
streaming=True)` (and `run_mim.py --streaming`) reads back with the same bytes and labels."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_simmim.cli import main
from hf_simmim.data import read_pixels


def image_bytes(seed, size, kind):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    """train/ and validation/ splits of 3 classes: PNGs and JPEGs of several sizes; `{file name: (bytes, class)}`."""
    files = {}
    for split, count in (("train", 24), ("validation", 6)):
        for i in range(count):
            name, kind = ("bird", "cat", "dog")[i % 3], ("PNG", "JPEG")[i % 2]
            data = image_bytes(len(files), (40 + i, 30 + 2 * i), kind)
            path = tmp_path / "folder" / split / name / f"{split}{i}.{kind.lower()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[path.name] = (data, name)
    return tmp_path / "folder", files


def read_back(output_dir, split):
    stream = datasets.load_dataset("parquet", data_dir=str(output_dir), streaming=True)[split]
    return stream.features, list(stream.cast_column("image", datasets.Image(decode=False)))


def test_an_image_folder_comes_back_with_its_bytes_labels_and_splits(image_folder, tmp_path, capsys):
    folder, files = image_folder
    out = tmp_path / "shards"
    assert main(["shard", str(folder), str(out), "--shard_size", "12KB"]) == 0
    captured = capsys.readouterr()
    assert "--streaming --train_dir" in captured.out and "image/s" in captured.err  # the progress bar
    train_shards = sorted(p.name for p in out.glob("train-*.parquet"))
    assert len(train_shards) > 1 and train_shards[0] == f"train-00000-of-{len(train_shards):05d}.parquet"
    seen = []
    for split in ("train", "validation"):
        features, rows = read_back(out, split)
        assert isinstance(features["image"], datasets.Image)  # decoded by datasets when read as it is
        assert features["label"].names == ["bird", "cat", "dog"]
        for row in rows:
            data, name = files[row["image"]["path"]]
            assert row["image"]["bytes"] == data and features["label"].int2str(row["label"]) == name
            assert row["image"]["path"].startswith(split)
            seen.append(row["image"]["path"])
    assert sorted(seen) == sorted(files)  # every image once
    decoded = next(iter(datasets.load_dataset("parquet", data_dir=str(out), streaming=True)["train"]))
    assert isinstance(decoded["image"], Image.Image)


def test_rows_are_shuffled_across_shards_unless_the_order_is_kept(image_folder, tmp_path):
    folder, _ = image_folder
    orders = {}
    for name, flags in (("kept", ["--keep_order"]), ("shuffled", [])):
        assert main(["shard", str(folder), str(tmp_path / name), *flags]) == 0
        orders[name] = [row["label"] for row in read_back(tmp_path / name, "train")[1]]
    assert orders["kept"] == sorted(orders["kept"])  # the folder lists its images class by class
    assert orders["shuffled"] != orders["kept"] and sorted(orders["shuffled"]) == orders["kept"]


def test_a_folder_of_npy_arrays_comes_back_as_the_same_arrays(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    arrays = {f"{i}.npy": np.random.default_rng(i).integers(0, 65535, (5, 16 + i, 16), dtype=np.uint16)
              for i in range(4)}
    for name, array in arrays.items():
        np.save(folder / name, array)
    assert main(["shard", str(folder), str(tmp_path / "out")]) == 0
    _, rows = read_back(tmp_path / "out", "train")
    assert sorted(row["image"]["path"] for row in rows) == sorted(arrays)
    for row in rows:
        assert row["image"]["bytes"] == (folder / row["image"]["path"]).read_bytes()
        np.testing.assert_array_equal(read_pixels(row["image"], 5), arrays[row["image"]["path"]])


def test_a_missing_source_or_a_folder_holding_shards_is_refused(image_folder, tmp_path, capsys):
    folder, _ = image_folder
    assert main(["shard", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["shard", str(folder), str(tmp_path / "out")]) == 0
    assert main(["shard", str(folder), str(tmp_path / "out")]) == 2
    assert "holds Parquet files already" in capsys.readouterr().err
