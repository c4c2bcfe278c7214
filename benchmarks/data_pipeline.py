"""Can the data pipeline feed the GPU? Images/s of run_mim.py's training data path, from image files to batches.

The path measured is the one `run_mim.py` gives the `Trainer`: `SeededImageDataset` (per-row seeded crop,
flip and mask) through `SimMIMTransform`, batched by a `torch.utils.data.DataLoader` with `collate_fn`. Reported:
the time per image of each stage in one process (open; the augmentation: decode, crop, resize and flip; uint8
array; mask), images/s of one process, and images/s of a DataLoader with each number of workers asked for. Compare
the last column with the training step's images/s (benchmarks/throughput.py): the GPU waits on data when it is
lower.

    python benchmarks/data_pipeline.py --image_dir /data/imagenet/train --workers 0,8,15   # your JPEGs
    python benchmarks/data_pipeline.py --workers 0,1                                         # generated JPEGs

With no --image_dir it writes --num_images JPEGs of --image_width x --image_height pixels (ImageNet's typical
size) made from the bundled CIFAR-10 sample, upscaled, with noise so the files are about as large (and as slow to
decode) as photographs of that size; the table prints their mean file size.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_simmim import SimMIMConfig, SimMIMImageProcessor  # noqa: E402
from hf_simmim.data.augmentation import pretraining_augmentation  # noqa: E402
from hf_simmim.data.image_ops import open_image, to_uint8_array  # noqa: E402
from hf_simmim.data.loading import bundled_sample_data_files  # noqa: E402
from hf_simmim.data.transforms import SeededImageDataset, SimMIMTransform, collate_fn  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_dir", default=None, help="a folder of images (searched recursively)")
    parser.add_argument("--preset", default="vit-base-patch16-224", help="sets image size and mask settings")
    parser.add_argument("--num_images", type=int, default=1024, help="images used (generated when no --image_dir)")
    parser.add_argument("--image_width", type=int, default=500)
    parser.add_argument("--image_height", type=int, default=375)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workers", default=None, help="comma-separated DataLoader worker counts (default: 0 and cpus-1)")
    parser.add_argument("--work_dir", default=None, help="where generated images go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = f"0,{max(1, (os.cpu_count() or 2) - 1)}"
    try:
        args.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers={args.workers!r}: give comma-separated integers, e.g. 0,8")
    if not args.workers or min(args.workers) < 0:
        parser.error("--workers: give counts >= 0, e.g. 0,8")
    for name in ("num_images", "batch_size", "image_width", "image_height"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def write_jpegs(folder, count, width, height, seed=0):
    """`count` JPEGs of `width` x `height` px from the bundled CIFAR-10 sample: upscaled, plus Gaussian noise
    (std 16 grey levels) so they compress about as little as photographs (plain upscaled CIFAR would decode far
    faster than real images)."""
    import datasets
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sample = datasets.load_dataset("parquet", data_files=bundled_sample_data_files())["train"]
    column = "img" if "img" in sample.column_names else "image"
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = sample[i % len(sample)][column].convert("RGB").resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 16.0, (height, width, 3))
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def image_files(image_dir, limit):
    files = sorted(str(p) for p in Path(image_dir).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--image_dir {image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return files[:limit]


def stage_times(paths, processor):
    """Mean milliseconds per image of each stage of the training transform, in this process."""
    import random

    rng = random.Random(0)
    mask_generator = processor.mask_generator(seed=0)
    augmentation = pretraining_augmentation(processor.image_size)
    totals = {"open": 0.0, "decode+crop+resize+flip": 0.0, "to_uint8": 0.0, "mask": 0.0}
    for path in paths:
        t0 = time.perf_counter()
        image = open_image(path)
        t1 = time.perf_counter()
        image = augmentation.augment(image, rng)
        t2 = time.perf_counter()
        to_uint8_array(image)
        t3 = time.perf_counter()
        mask_generator()
        t4 = time.perf_counter()
        for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += seconds
    return {key: 1e3 * value / len(paths) for key, value in totals.items()}


def loader_rate(dataset, batch_size, workers):
    """Images/s of a DataLoader as the Trainer builds it (shuffled, collated), after its first batch."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_fn,
        persistent_workers=False, prefetch_factor=4 if workers else None, drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not the steady state
    images, start = 0, time.perf_counter()
    for batch in iterator:
        images += batch["pixel_values"].shape[0]
    elapsed = time.perf_counter() - start
    return images / elapsed if images else float("nan")


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return measure(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests call main in their own process)


def measure(args):
    config = SimMIMConfig.from_preset(args.preset)
    processor = SimMIMImageProcessor.from_model_config(config)
    with tempfile.TemporaryDirectory() as scratch:
        if args.image_dir:
            paths = image_files(args.image_dir, args.num_images)
            source = args.image_dir
        else:
            paths = write_jpegs(args.work_dir or scratch, args.num_images, args.image_width, args.image_height)
            source = f"{len(paths)} generated {args.image_width}x{args.image_height} JPEGs"
        if len(paths) < 2 * args.batch_size:
            raise SystemExit(f"{len(paths)} images are too few for two batches of {args.batch_size}: lower --batch_size.")
        mean_kb = statistics.fmean(os.path.getsize(p) for p in paths) / 1e3

        import datasets

        dataset = datasets.Dataset.from_dict({"image": paths}).cast_column("image", datasets.Image())
        pretraining = SeededImageDataset(  # as run_mim.py: uint8 batches, normalised later on the device
            dataset, SimMIMTransform(processor, train=True, keep_columns=(), uint8=True), seed=0
        )
        stages = stage_times(paths[: min(len(paths), 256)], processor)
        rates = {workers: loader_rate(pretraining, args.batch_size, workers) for workers in args.workers}

    per_image_ms = sum(stages.values())
    result = {
        "source": source, "mean_file_kb": round(mean_kb, 1), "preset": args.preset, "image_size": processor.image_size,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "stage_ms": {k: round(v, 3) for k, v in stages.items()},
        "transform_images_per_s_one_process": round(1e3 / per_image_ms, 1),
        "loader_images_per_s": {str(workers): round(rate, 1) for workers, rate in rates.items()},
    }
    lines = [
        f"data pipeline: {source} (mean {mean_kb:.0f} KB) -> {args.preset} ({processor.image_size} px), "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs",
        "per image, one process: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items())
        + f"  => {result['transform_images_per_s_one_process']:.0f} images/s",
        f"{'DataLoader workers':>20} {'images/s':>10}",
        *(f"{workers:>20} {rate:>10.0f}" for workers, rate in rates.items()),
    ]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
