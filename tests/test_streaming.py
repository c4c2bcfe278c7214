"""Streaming (`run_mim.py --streaming`): shards split across processes, shuffled per epoch, undecodable images
skipped and counted, and a run killed with SIGKILL resumed to the same weights as an uninterrupted one."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, load_script
from hf_simmim import SimMIMConfig, SimMIMImageProcessor
from hf_simmim.data import SimMIMTransform, collate_fn, detect_image_column, load_image_datasets
from hf_simmim.data.streaming import StreamingImageDataset
from hf_simmim.training.callbacks import STREAM_LAYOUT_FILE, check_stream_layout

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_mim.py"
CPU_2PROC = ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                         os.environ.get("PYTHONPATH", "")])}
GARBAGE = b"not an image"


def png_bytes(seed, size=40):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder, shards=4, per_shard=20, corrupt=(), kind="arrow"):
    """`shards` files of `per_shard` images each (Arrow, or Parquet); `label` numbers the images 0..N-1 in file
    order; the images at the numbers in `corrupt` are garbage. (Arrow is the quicker to test with: datasets waits
    5 s for reading threads each time a shuffled pass over Parquet files ends.)"""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    count = shards * per_shard
    images = [{"bytes": GARBAGE + bytes([i]) if i in corrupt else png_bytes(i), "path": f"{i}.png"} for i in range(count)]
    table = datasets.Dataset.from_dict({"image": images, "label": list(range(count))}, features=features)
    if kind == "arrow":
        table.save_to_disk(str(folder), num_shards=shards)  # data-0000i-of-0000N.arrow, in order
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for shard in range(shards):
            part = table.shard(shards, shard, contiguous=True)
            part.to_parquet(str(folder / f"train-{shard:05d}-of-{shards:05d}.parquet"))
    return folder


def tiny_processor():
    return SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))


def streamed(stream, rank=0, world_size=1, buffer_size=16):
    """The training stream of process `rank`, its samples keeping the label (the image's number)."""
    transform = SimMIMTransform(tiny_processor(), train=True, image_column="image", keep_columns=("label",), uint8=True)
    return StreamingImageDataset(stream, transform, seed=7, buffer_size=buffer_size, rank=rank, world_size=world_size)


def stream_of(folder):
    train, validation = load_image_datasets(train_dir=str(folder), streaming=True)
    assert validation is None
    return train


def labels_of(batches):
    return [int(label) for batch in batches for label in batch["labels"]]


# ---------------------------------------------------------------------------------------------- the stream itself
@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_read_disjoint_shards_reshuffled_every_epoch(tmp_path, workers):
    stream = stream_of(write_shards(tmp_path / "data"))
    epochs = {}
    for rank in (0, 1):
        loader = streamed(stream, rank, world_size=2).dataloader(10, collate_fn, num_workers=workers)
        seen = labels_of(islice(loader, 8))  # 80 images: 40 per process and epoch, two epochs
        epochs[rank] = seen[:40], seen[40:]
    for epoch in (0, 1):
        first, second = epochs[0][epoch], epochs[1][epoch]
        assert sorted(first + second) == list(range(80))  # each image once per epoch, over both processes
        # whole shards (20 consecutive numbers) per process
        assert {label // 20 for label in first}.isdisjoint({label // 20 for label in second})
    for rank in (0, 1):
        assert epochs[rank][0] != epochs[rank][1]  # reshuffled: another shard set or order in the next epoch
        assert epochs[rank][0][:20] != sorted(epochs[rank][0][:20])  # the buffer shuffles within shards


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more than the 2 CPUs of CI
def test_a_resumed_stream_continues_at_the_same_sample_with_workers(tmp_path):
    """3 DataLoader workers for 2 shards per process: one idles, the two others serve batches in turn. A stream told
    that 5 batches were trained on serves the 6th batch on, the same pixels and masks (crossing an epoch)."""
    stream = stream_of(write_shards(tmp_path / "data", corrupt={5, 33}))
    full = list(islice(streamed(stream, 1, 2).dataloader(8, collate_fn, num_workers=3), 12))
    resumed_dataset = streamed(stream, 1, 2)
    resumed_dataset.start_batch = 5
    resumed = list(islice(resumed_dataset.dataloader(8, collate_fn, num_workers=3), 7))
    for expected, batch in zip(full[5:], resumed):
        assert torch.equal(expected["pixel_values"], batch["pixel_values"])
        assert torch.equal(expected["bool_masked_pos"], batch["bool_masked_pos"])
        assert torch.equal(expected["labels"], batch["labels"])


def test_undecodable_images_are_skipped_with_a_stand_in_and_counted_once(tmp_path, caplog):
    stream = stream_of(write_shards(tmp_path / "data", shards=2, per_shard=10, corrupt={3, 14}))
    dataset = streamed(stream)
    with caplog.at_level("WARNING"):
        batches = list(islice(dataset.dataloader(5, collate_fn), 12))  # 3 epochs of 20 images
    assert all(len(batch["labels"]) == 5 for batch in batches)  # a batch keeps its size
    labels = labels_of(batches)
    for epoch in range(3):
        seen = labels[20 * epoch : 20 * (epoch + 1)]
        assert 3 not in seen and 14 not in seen
        assert sorted(set(seen)) == sorted(set(range(20)) - {3, 14})  # two stand-ins: two images twice
    reports = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(reports) == 6 and sum("3.png" in r for r in reports) == 3  # each read is reported
    assert len(dataset.skipped.digests()) == 2  # distinct images


def test_parquet_shards_image_folders_and_webdataset_shards_stream(tmp_path):
    parquet = write_shards(tmp_path / "parquet", shards=2, per_shard=3, kind="parquet")
    folder = tmp_path / "folder"
    for i in range(6):
        (folder / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        (folder / ("cat" if i % 2 else "dog") / f"{i}.png").write_bytes(png_bytes(i))
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in range(2):
        with tarfile.open(tars / f"shard-{shard:05d}.tar", "w") as archive:
            for i in range(3):
                for suffix, data in (("png", png_bytes(10 + i)), ("cls", str(i % 2).encode())):
                    member = tarfile.TarInfo(f"{shard}_{i}.{suffix}")
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
    for source, image_column, label_column in ((parquet, "image", "label"), (folder, "image", "label"),
                                               (tars, "png", "cls")):
        stream = stream_of(source)
        assert detect_image_column(stream) == image_column and label_column in stream.column_names
        transform = SimMIMTransform(tiny_processor(), train=True, image_column=image_column, uint8=True)
        dataset = StreamingImageDataset(stream, transform, seed=0, buffer_size=4, world_size=2)
        batch = next(iter(dataset.dataloader(3, collate_fn)))
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["bool_masked_pos"].shape == (3, 8, 8)


def test_a_changed_layout_is_refused_on_resume(tmp_path):
    layout = {"processes": 2, "per_device_train_batch_size": 8, "seed": 7}
    (tmp_path / STREAM_LAYOUT_FILE).write_text(json.dumps(layout))
    check_stream_layout(str(tmp_path), layout)
    with pytest.raises(ValueError, match=r"per_device_train_batch_size 8 -> 16.*--ignore_data_skip"):
        check_stream_layout(str(tmp_path), {**layout, "per_device_train_batch_size": 16})


# ---------------------------------------------------------------------------------------------- run_mim.py --streaming
def test_streaming_without_max_steps_is_refused_before_loading(tmp_path):
    run_mim = load_script("examples/run_mim.py")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        run_mim.main(["--streaming", "--train_dir", str(tmp_path / "nothing"), "--output_dir", str(out)])
    with pytest.raises(ValueError, match="--max_train_samples does not apply with --streaming"):
        run_mim.main(["--streaming", "--max_steps", "2", "--max_train_samples", "8", "--output_dir", str(out)])
    assert not out.exists()


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import hf_simmim.training as training

    kill_at = int(os.environ["KILL_AT_STEP"])
    original = training.SimMIMTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step >= kill_at:  # the checkpoint of the step before is saved: killed as a job is
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    training.SimMIMTrainer.training_step = training_step
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    import run_mim
    sys.exit(run_mim.main(sys.argv[2:]))
    """
)


def run_losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_a_streamed_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """80 images in 4 shards (one undecodable), 2 DataLoader workers, batch 8, 16 steps: each worker passes its epoch
    boundary. Killed with SIGKILL at step 13 (checkpoint-12 saved), resumed from checkpoint-12: the stream replays
    each worker's 6 batches and goes on with the same images, crops and masks."""
    from safetensors.torch import load_file

    data = write_shards(tmp_path / "data", corrupt={27})
    argv = ["--streaming", "--train_dir", str(data), "--max_steps", "16", "--per_device_train_batch_size", "8",
            "--shuffle_buffer_size", "16", "--dataloader_num_workers", "2", "--save_steps", "6", "--logging_steps",
            "1", "--num_reconstruction_images", "0", "--report_to", "none", "--disable_tqdm", "true"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_mim = load_script("examples/run_mim.py")
    assert run_mim.main(argv + ["--output_dir", str(full)]) == 0

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    result = subprocess.run([sys.executable, str(killer), str(SCRIPT), *argv, "--output_dir", str(killed)],
                            env={**ENV, "KILL_AT_STEP": "13"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert (killed / "checkpoint-12" / STREAM_LAYOUT_FILE).is_file()

    assert run_mim.main(argv + ["--output_dir", str(killed), "--resume_from_checkpoint", "last"]) == 0
    assert run_losses(killed)[12:] == pytest.approx(run_losses(full)[12:], rel=1e-5)
    expected, resumed = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((full / "all_results.json").read_text())["train_skipped_images"] == 1


def test_two_processes_stream_their_shares_and_count_an_undecodable_image_once(tmp_path):
    """2 gloo processes x batch 4 x 6 steps: each reads its shards of 40 images past its first epoch (20 images)."""
    data = write_shards(tmp_path / "data", shards=4, per_shard=10, corrupt={3})
    out = tmp_path / "run"
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC), "--main_process_port",
         str(free_port()), str(SCRIPT), "--streaming", "--train_dir", str(data), "--max_steps", "6",
         "--per_device_train_batch_size", "4", "--shuffle_buffer_size", "8", "--logging_steps", "1", "--save_strategy",
         "no", "--num_reconstruction_images", "0", "--report_to", "none", "--output_dir", str(out)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "Streaming 4 shard(s) over 2 process(es)" in launched.stderr and "total batch 8" in launched.stderr
    assert "Skipping train stream example" in launched.stderr
    assert len(run_losses(out)) == 6
    assert json.loads((out / "all_results.json").read_text())["train_skipped_images"] == 1
