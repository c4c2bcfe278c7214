"""What exact resumption of a streamed run costs: images/s of `run_mim.py --streaming`'s training data path against
images/s of the replay a resumed run does first (reading and shuffling the examples already trained on, without
decoding them), on Parquet shards written by `hf-simmim shard`.

    python benchmarks/streaming_replay.py                        # 4096 generated 500x375 JPEGs, 8 shards
    python benchmarks/streaming_replay.py --image_dir /data/imagenet/val --num_images 4096

A resumed run replays, in each DataLoader worker, the examples that worker served before the checkpoint: the
replay takes (examples trained on since the start of the run) / (replay rate), spread over the workers.
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_pipeline import image_files, write_jpegs  # noqa: E402

from hf_simmim import SimMIMConfig, SimMIMImageProcessor  # noqa: E402
from hf_simmim.data.augmentation import pretraining_augmentation  # noqa: E402
from hf_simmim.data.loading import load_image_datasets  # noqa: E402
from hf_simmim.data.shards import write_shards  # noqa: E402
from hf_simmim.data.streaming import StreamingImageDataset  # noqa: E402
from hf_simmim.data.transforms import SimMIMTransform, collate_fn  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", default=None, help="a folder of images (default: generated JPEGs)")
    parser.add_argument("--num_images", type=int, default=4096)
    parser.add_argument("--shards", type=int, default=8, help="Parquet shards the images are written as")
    parser.add_argument("--preset", default="vit-base-patch16-224", help="sets image size and mask settings")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--buffer_size", type=int, default=256)
    return parser.parse_args(argv)


def stream_dataset(stream, processor, args, start_batch=0):
    transform = SimMIMTransform(processor, train=True, image_column="image", uint8=True,
                                augmentation=pretraining_augmentation(processor.image_size))
    dataset = StreamingImageDataset(stream, transform, seed=0, buffer_size=args.buffer_size)
    dataset.start_batch = start_batch
    return dataset


def seconds_to(dataset, batch_size, batches):
    """Seconds to the `batches`-th batch of `dataset`."""
    iterator = iter(dataset.dataloader(batch_size, collate_fn))
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    gc.collect()  # a closed Parquet stream waits for datasets' reading threads (5 s): here, not in the next timing
    return elapsed


def main(argv=None):
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="streaming_replay_"))
    if args.image_dir is None:
        args.image_dir = str(work / "images")
        write_jpegs(Path(args.image_dir), args.num_images, 500, 375)
    folder = work / "folder"
    folder.mkdir()
    for index, path in enumerate(image_files(args.image_dir, args.num_images)):
        (folder / f"{index:06d}{Path(path).suffix}").symlink_to(Path(path).resolve())
    size = sum(p.stat().st_size for p in folder.iterdir()) // args.shards + 1
    write_shards(str(folder), str(work / "shards"), size, progress=False)
    stream, _ = load_image_datasets(train_dir=str(work / "shards"), streaming=True)
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset(args.preset))

    # within the first epoch, before its source runs out (a buffer's worth before its end): datasets then waits 5 s
    # for its Parquet reading threads, once per epoch and worker, which is not the replay's cost
    batches = (args.num_images - args.buffer_size) // args.batch_size - 1
    seconds_to(stream_dataset(stream, processor, args), args.batch_size, 1)  # warm-up: files opened, code loaded
    first = statistics.median(seconds_to(stream_dataset(stream, processor, args), args.batch_size, 1)
                              for _ in range(3))
    trained = seconds_to(stream_dataset(stream, processor, args), args.batch_size, batches + 1) - first
    resumed = statistics.median(seconds_to(stream_dataset(stream, processor, args, batches), args.batch_size, 1)
                                for _ in range(3)) - first
    images = batches * args.batch_size
    print(f"{images} images of {processor.image_size} px ({args.preset}), {args.shards} Parquet shards, batch "
          f"{args.batch_size}, shuffle buffer {args.buffer_size}, one process without DataLoader workers:")
    print(f"  training data path   {images / trained:8.1f} images/s")
    print(f"  replay on resumption {images / resumed:8.1f} images/s  ({trained / resumed:.0f}x faster)")


if __name__ == "__main__":
    main()
