"""Does SimMIM pretraining pay off? Pretrain, then fine-tune with few labels, against the same fine-tuning from
scratch, through the package's own run_mim.py and run_finetune.py.

Protocol: pretrain a ViT-Tiny (patch 4, 32 px) on the 10,000 unlabeled training images of cifar10-small, measure
masked reconstruction (L1, PSNR) on its 2,000 test images with fixed masks, fine-tune on 100 labels per class,
evaluate top-1 on the 2,000 test images; fine-tune the same architecture from scratch the same way; print both
accuracies and the gain.

    python benchmarks/quality_cifar10.py --data_dir ../shared/data/cifar10-small          # GPU, under 10 minutes
    python benchmarks/quality_cifar10.py --data_dir ../shared/data/cifar10-small --smoke  # a CPU check of the path
"""

import argparse
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hf_simmim import SimMIMForMaskedImageModeling, SimMIMImageProcessor, metrics  # noqa: E402
from hf_simmim.data.transforms import SimMIMTransform, collate_fn# noqa: E402
from hf_simmim.data.loading import undecoded# noqa: E402


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-small"),
                        help="folder with train-*.parquet and test-*.parquet (cifar10-small)")
    parser.add_argument("--output_dir", default="outputs/quality_cifar10")
    parser.add_argument("--preset", default="vit-tiny-patch4-32")
    parser.add_argument("--pretrain_epochs", type=float, default=100)
    parser.add_argument("--pretrain_batch_size", type=int, default=256)
    parser.add_argument("--pretrain_base_lr", type=float, default=2e-3, help="per 512 images")
    parser.add_argument("--finetune_epochs", type=float, default=100)
    parser.add_argument("--finetune_batch_size", type=int, default=128)
    parser.add_argument("--finetune_base_lr", type=float, default=5e-3, help="per 512 images")
    parser.add_argument("--samples_per_class", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default: 8 on GPU, 0 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_args", default="", help="more run_mim.py flags, e.g. '--config_overrides mask_ratio=0.5'")
    parser.add_argument("--finetune_args", default="",
                        help="more run_finetune.py flags for both fine-tunings, e.g. '--layer_decay 0.75 --rand_augment none'")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a tiny model: checks the path on CPU")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 8 if torch.cuda.is_available() else 0
    if args.smoke:
        args.preset = "vit-tiny-test"
        args.pretrain_epochs = args.finetune_epochs = 1
        args.samples_per_class = 4
    return args


def data_files(data_dir):
    """Globs of the training and test Parquet files (run_mim / run_finetune accept globs)."""
    train, test = str(Path(data_dir) / "train-*.parquet"), str(Path(data_dir) / "test-*.parquet")
    if not list(Path(data_dir).glob("train-*.parquet")) or not list(Path(data_dir).glob("test-*.parquet")):
        raise FileNotFoundError(f"{data_dir} has no train-*.parquet / test-*.parquet: pass --data_dir (cifar10-small).")
    return train, test


@torch.no_grad()
def reconstruction_metrics(checkpoint, test_files, batch_size=256, max_images=None):
    """Masked L1 and PSNR of the pretrained model on the test images, with fixed masks (mask_seed 0)."""
    import datasets

    model = SimMIMForMaskedImageModeling.from_pretrained(checkpoint).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    processor = SimMIMImageProcessor.from_pretrained(checkpoint)
    test = datasets.load_dataset("parquet", data_files={"test": test_files})["test"]
    if max_images:
        test = test.select(range(min(max_images, len(test))))
    rows = undecoded(test, "image").map(
        SimMIMTransform(processor, train=False, mask_seed=0, keep_columns=()), batched=True, with_indices=True,
        remove_columns=test.column_names,
    ).with_format("numpy")
    metric = metrics.load("masked_reconstruction")
    for start in range(0, len(rows), batch_size):
        batch = collate_fn([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        output = model(batch["pixel_values"].to(device), bool_masked_pos=batch["bool_masked_pos"].to(device))
        metric.add_batch(
            predictions=output.reconstruction.float().cpu().numpy(),
            references=batch["pixel_values"].numpy(),
            masks=batch["bool_masked_pos"].numpy().astype(np.float32),
        )
    return metric.compute(image_mean=processor.image_mean, image_std=processor.image_std)


def pretrain(args, train_files, test_files, out, common):
    """Pretrain on the training images; return the masked reconstruction metrics on the test images."""
    argv = [
        "--preset", args.preset, "--train_dir", train_files, "--validation_dir", test_files,
        "--output_dir", str(out / "pretrain"), "--num_train_epochs", str(args.pretrain_epochs),
        "--per_device_train_batch_size", str(args.pretrain_batch_size), "--base_learning_rate", str(args.pretrain_base_lr),
        "--eval_strategy", "no", "--num_reconstruction_images", "8", *common,
    ]
    if args.smoke:
        argv += ["--max_train_samples", "64", "--max_eval_samples", "16"]
    if _example("run_mim").main(argv + shlex.split(args.pretrain_args)) != 0:
        raise RuntimeError("pretraining failed")
    return reconstruction_metrics(out / "pretrain", test_files, max_images=64 if args.smoke else None)


def finetune(args, name, extra, train_files, test_files, out, common):
    """Fine-tune the pretrained encoder (or, with `--from_scratch` in `extra`, the same architecture afresh)."""
    argv = [
        "--model_name_or_path", str(out / "pretrain"), *extra, "--train_dir", train_files,
        "--validation_dir", test_files, "--output_dir", str(out / f"finetune-{name}"),
        "--samples_per_class", str(args.samples_per_class), "--num_train_epochs", str(args.finetune_epochs),
        "--per_device_train_batch_size", str(args.finetune_batch_size),
        "--base_learning_rate", str(args.finetune_base_lr), "--eval_strategy", "no", *common,
    ]
    if args.smoke:
        argv += ["--max_eval_samples", "64"]
    if _example("run_finetune").main(argv + shlex.split(args.finetune_args)) != 0:
        raise RuntimeError(f"fine-tuning ({name}) failed")
    return json.loads((out / f"finetune-{name}" / "all_results.json").read_text())


def print_summary(summary):
    print("\n".join([
        "", "=" * 78, f"quality_cifar10 ({summary['device']})", summary["protocol"],
        f"  top-1 fine-tuned from SimMIM pretraining  {summary['top1_pretrained']:.4f}",
        f"  top-1 fine-tuned from scratch             {summary['top1_scratch']:.4f}",
        f"  gain                                      {summary['gain_points']:+.1f} points",
        f"  masked reconstruction (test)              L1 {summary['masked_l1']:.4f}, PSNR {summary['psnr_db']:.2f} dB",
        f"  time: pretrain {summary['pretrain_s']} s, fine-tune {summary['finetune_pretrained_s']} s + "
        f"{summary['finetune_scratch_s']} s", "=" * 78,
    ]))


def main(argv=None):
    args = parse_args(argv)
    train_files, test_files = data_files(args.data_dir)
    out = Path(args.output_dir)
    common = ["--seed", str(args.seed), "--dataloader_num_workers", str(args.workers), "--report_to", "none",
              "--overwrite_output_dir", "--save_strategy", "no"]
    if args.workers:  # short epochs (8 steps when fine-tuning): keep the workers instead of forking them again
        common += ["--dataloader_persistent_workers", "true"]
    if args.smoke:
        common += ["--max_steps", "3"]
    timings, results = {}, {}
    start = time.perf_counter()
    reconstruction = pretrain(args, train_files, test_files, out, common)
    timings["pretrain_s"] = time.perf_counter() - start
    for name, extra in (("pretrained", []), ("scratch", ["--from_scratch"])):
        start = time.perf_counter()
        results[name] = finetune(args, name, extra, train_files, test_files, out, common)
        timings[f"finetune_{name}_s"] = time.perf_counter() - start
    summary = {
        "protocol": f"{args.preset}: pretrain {args.pretrain_epochs} epochs on {train_files}; fine-tune "
        f"{args.finetune_epochs} epochs on {args.samples_per_class} labels/class; test on {test_files}"
        + "".join(f"; {name} {value!r}" for name, value in (("pretrain_args", args.pretrain_args),
                                                              ("finetune_args", args.finetune_args)) if value),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "top1_pretrained": results["pretrained"]["eval_top1"],
        "top1_scratch": results["scratch"]["eval_top1"],
        "gain_points": 100 * (results["pretrained"]["eval_top1"] - results["scratch"]["eval_top1"]),
        "masked_l1": reconstruction["masked_l1"],
        "psnr_db": reconstruction["psnr"],
        **{k: round(v, 1) for k, v in timings.items()},
    }
    os.makedirs(out, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
