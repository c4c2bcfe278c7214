"""Training-step throughput of hf_simmim's SimMIMForMaskedImageModeling against transformers' own MIM heads.

In one process, on one device, each model runs full training steps (forward, backward, AdamW step) at the same
architecture, batch size, precision and mask ratio, on random data. Reported per model: images/s (median over
repeats, timed after warm-up with device events on CUDA), FLOPs per image (torch.utils.flop_counter), MFU against
a matmul rate measured here, peak memory, and the ratio ours / transformers.

    python benchmarks/throughput.py                       # GPU: ViT-B/16@224 and Swin-B w6@192, batch 128, bf16
    python benchmarks/throughput.py --tiny                # CPU-sized presets (what CI runs)
    python benchmarks/throughput.py --compile             # also time torch.compile'd models
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator  # noqa: E402

FULL = {"vit": "vit-base-patch16-224", "swin": "swin-base-window6-192"}
TINY = {"vit": "vit-tiny-test", "swin": "swin-tiny-test"}


def transformers_model(config):
    """transformers' own MIM head at the same widths, depths and sizes. transformers has no SimMIM ViT variant, so
    the ViT row compares ours (shared relative position bias, layer scale) with its plain ViT."""
    from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

    from hf_simmim.convert import transformers_config_from_simmim

    if config.backbone == "vit":
        plain = SimMIMConfig(**{**config.to_dict(), "use_absolute_position_embeddings": True,
                                "use_shared_relative_position_bias": False, "use_relative_position_bias": False,
                                "layer_scale_init_value": 0.0})
        return ViTForMaskedImageModeling(transformers_config_from_simmim(plain))
    return SwinForMaskedImageModeling(transformers_config_from_simmim(config))


def matmul_rate(device, dtype):
    """Measured dense matmul FLOP/s (the MFU denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_repeats(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / statistics.median(times)


def time_repeats(step, device, warmup, repeats):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def make_step(model, pixel_values, mask, device, amp_dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_backward():
        with autocast:
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward


def measure(name, model, config, args, device, amp_dtype, peak_rate):
    model = model.to(device).train()
    batch = args.batch_size
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    generator = SimMIMMaskGenerator.from_config(config, seed=0)
    mask = torch.from_numpy(np.stack([generator() for _ in range(batch)])).to(device).flatten(1)
    step, forward_backward = make_step(model, pixel_values, mask, device, amp_dtype)
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    flops_per_image = counter.get_total_flops() / batch
    if args.compile:
        model.forward = torch.compile(model.forward)
        step, _ = make_step(model, pixel_values, mask, device, amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = time_repeats(step, device, args.warmup, args.repeats)
    seconds = statistics.median(times)
    images_per_second = batch / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "model": name,
        "batch": batch,
        "images_per_s": images_per_second,
        "gflop_per_image": flops_per_image / 1e9,
        "mfu": flops_per_image * images_per_second / peak_rate,
        "peak_mem_gib": peak,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "swin"], choices=["vit", "swin"])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU presets (CI)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 128 (GPU), 8 (--tiny)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (8 if args.tiny else 128)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 10)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.tiny else 20)
    return args


def format_table(rows, device_name):
    lines = [
        f"device: {device_name}",
        f"{'model':<44} {'batch':>5} {'images/s':>10} {'GFLOP/img':>10} {'MFU':>6} {'peak GiB':>9} {'ratio':>6}",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        peak = "n/a" if row["peak_mem_gib"] != row["peak_mem_gib"] else f"{row['peak_mem_gib']:.2f}"
        lines.append(
            f"{row['model']:<44} {row['batch']:>5} {row['images_per_s']:>10.1f} {row['gflop_per_image']:>10.2f} "
            f"{row['mfu']:>6.3f} {peak:>9} {ratio:>6}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_rate = matmul_rate(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    device_name += f", {precision}, measured matmul {peak_rate / 1e12:.1f} TFLOP/s"
    presets = TINY if args.tiny else FULL
    rows = []
    for backbone in args.models:
        torch.manual_seed(0)
        config = SimMIMConfig.from_preset(presets[backbone], drop_path_rate=0.0)
        reference = transformers_model(config)
        theirs = measure(f"transformers {type(reference).__name__}", reference, config, args, device, amp_dtype, peak_rate)
        del reference
        ours = measure(f"hf_simmim {presets[backbone]}", SimMIMForMaskedImageModeling(config), config, args, device, amp_dtype, peak_rate)
        ours["ratio"] = ours["images_per_s"] / theirs["images_per_s"]
        rows += [theirs, ours]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table = format_table(rows, device_name)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
