"""Training-step throughput of hf_simmim's SimMIMForMaskedImageModeling against transformers' own MIM heads.

In one process, on one device, both models run full training steps (forward, backward, AdamW step, zero_grad) at
the same architecture, batch size, precision and mask ratio, on random data. After warm-up of both, their steps
alternate (ours, transformers', ours, ...), so noise from a shared machine hits both alike. Reported per model:
- `step_ms`, `images_per_s`: the median step time (CUDA events on CUDA); on our rows `ratio`: the median over the
  pairs of consecutive steps of transformers' step time / ours (above 1: ours is faster);
- what does not depend on timing: FLOPs per image (`gflop_per_image`, torch.utils.flop_counter, forward + backward),
  MFU against a matmul rate measured here, and the bytes allocated in one training step after warm-up:
  `allocated_bytes_per_step`, every allocation summed, and `peak_live_bytes`, the most bytes allocated during the
  step and not yet freed, above what was live at its start. On CUDA they come from the caching allocator's
  statistics (its blocks, rounded up to 512 bytes); on CPU, where torch keeps no allocator statistics, from
  torch.profiler's memory events (`profile_memory=True`): the CPU allocator reports every allocation and free with
  the exact bytes asked for, kernels' internal workspaces included. Both counts are exact and repeat to the byte
  from step to step; on CPU a few kernels size a workspace by the thread count, so they depend on it (slightly);
- on CUDA, `peak_mem_gib`: the model's resident training state (parameters, AdamW state, inputs) plus the step's
  peak live bytes.

    python benchmarks/throughput.py              # GPU: ViT-B/16@224 and Swin-B w6@192, batch 128, bf16
    python benchmarks/throughput.py --cpu        # CPU size, steps of 50 ms or more on 2 cores (batch 8, fp32)
    python benchmarks/throughput.py --tiny       # the tiny presets (what CI runs)
    python benchmarks/throughput.py --compile    # time torch.compile'd models
    python benchmarks/throughput.py --cpu --models vit vit-plain swin   # also ours as a plain ViT

Bytes per step, ours against transformers' at the same architecture: the Swin allocates less (the shifted-window
bias is expanded over the batch in both, transformers' also copies the shift mask per batch entry), and so does
ours as a plain ViT (`vit-plain`). What remains above transformers':
- the `vit` rows compare different models: transformers has no SimMIM ViT, so its plain ViT (absolute position
  embeddings) stands against the official SimMIM ViT (a shared relative position bias added to every attention, a
  layer-scale multiply on every residual branch). On CPU the learned bias also moves SDPA off the fused kernel
  (which gives no gradient for a bias) to the math kernel, which allocates and keeps the attention probabilities;
- Swin with one attention head (the tiny preset's first stage), on CPU: a higher peak, not more bytes in all. The
  math kernel keeps the value heads for backward as they come, a view: with one head, transformers' view holds its
  own value projection (B, L, C), ours the fused query-key-value projection (B, L, 3C). With more heads both copy
  the values, and ours' peak is no higher.
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
from torch._C._profiler import _EventType
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator  # noqa: E402

# Each size: backbone -> (preset, overrides of the preset).
SIZES = {
    "full": {"vit": ("vit-base-patch16-224", {}), "swin": ("swin-base-window6-192", {})},
    # ViT-Tiny/4 at 32 px (12 layers, 192 wide); a 3-stage Swin at 64 px: 32x32, 16x16, 8x8 tokens, windows of 4.
    "cpu": {
        "vit": ("vit-tiny-patch4-32", {}),
        "swin": ("swin-tiny-test", dict(image_size=64, embed_dim=48, depths=[2, 2, 2], num_heads=[2, 4, 8])),
    },
    "tiny": {"vit": ("vit-tiny-test", {}), "swin": ("swin-tiny-test", {})},
}


def plain_vit_config(config):
    """`config` as a plain ViT (absolute position embeddings, no relative position bias, no layer scale): the
    architecture of transformers' ViT."""
    return SimMIMConfig(**{**config.to_dict(), "use_absolute_position_embeddings": True,
                           "use_shared_relative_position_bias": False, "use_relative_position_bias": False,
                           "layer_scale_init_value": 0.0})


def transformers_model(config):
    """transformers' own MIM head at the same widths, depths and sizes. transformers has no SimMIM ViT variant, so
    the ViT row compares ours (shared relative position bias, layer scale) with its plain ViT (`vit-plain`: ours as
    a plain ViT too)."""
    from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

    from hf_simmim.convert import transformers_config_from_simmim

    if config.backbone == "vit":
        return ViTForMaskedImageModeling(transformers_config_from_simmim(plain_vit_config(config)))
    return SwinForMaskedImageModeling(transformers_config_from_simmim(config))


def matmul_rate(device, dtype):
    """Dense matmul FLOP/s, the best of 10 (the MFU denominator: the rate this device reaches)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / min(seconds_of(lambda: a @ b, device) for _ in range(10))


def seconds_of(step, device):
    """Wall time of one call of `step` (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def time_interleaved(steps, device, warmup, repeats):
    """`steps`: name -> step. Warms each up, then runs them in turn `repeats` times; name -> seconds per repeat."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(seconds_of(step, device))
    return times


def allocation_events(node_trees):
    for node in node_trees:
        if node.tag == _EventType.Allocation:
            yield node
        yield from allocation_events(node.children)


def allocated_bytes(step, device):
    """Bytes the allocator of `device` hands out during one call of `step`: (the sum of every allocation, the peak
    of live bytes above those live at the start). On CUDA from the caching allocator's statistics; on CPU, which
    keeps none, from torch.profiler's memory events: each block's exact size, signed (negative when freed), in
    time order; a block allocated before the call is not reported when freed."""
    if device.type == "cuda":
        return cuda_allocated_bytes(step, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        step()
    events = [
        node for node in allocation_events(profile.profiler.kineto_results.experimental_event_tree())
        if node.extra_fields.device.type == device.type
    ]
    events.sort(key=lambda node: node.start_time_ns)
    sizes = [node.extra_fields.alloc_size for node in events]
    live = np.cumsum([0] + sizes)
    return sum(size for size in sizes if size > 0), int(live.max())


def cuda_allocated_bytes(step, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start_total = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"]
    start_live = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    total = torch.cuda.memory_stats(device)["allocated_bytes.all.allocated"] - start_total
    return total, torch.cuda.max_memory_allocated(device) - start_live


def make_step(model, pixel_values, mask, device, amp_dtype):
    """The training step (forward, backward, AdamW step) and its forward + backward alone, and the optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )

    def forward_backward():
        with autocast:
            loss = model(pixel_values=pixel_values, bool_masked_pos=mask).loss
        loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward, optimizer


def resident_bytes(model, optimizer, *inputs):
    """Bytes a training step holds between steps: parameters, optimizer state, inputs."""
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.untyped_storage().nbytes() for t in [*model.parameters(), *state, *inputs])


def prepare(name, model, config, args, device, amp_dtype):
    """A model ready to time: its training step and the figures that do not depend on timing."""
    model = model.to(device).train()
    batch = args.batch_size
    pixel_values = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    generator = SimMIMMaskGenerator.from_config(config, seed=0)
    mask = torch.from_numpy(np.stack([generator() for _ in range(batch)])).to(device).flatten(1)
    step, forward_backward, optimizer = make_step(model, pixel_values, mask, device, amp_dtype)
    with FlopCounterMode(display=False) as counter:
        forward_backward()
    optimizer.zero_grad(set_to_none=True)
    if args.compile:
        model.forward = torch.compile(model.forward)
    for _ in range(2):  # the optimizer state exists and compilation is done before bytes are counted
        step()
    allocated, peak_live = allocated_bytes(step, device)
    peak_mem = float("nan")
    if device.type == "cuda":
        peak_mem = (resident_bytes(model, optimizer, pixel_values, mask) + peak_live) / 2**30
    row = {"model": name, "batch": batch, "gflop_per_image": counter.get_total_flops() / batch / 1e9,
           "allocated_bytes_per_step": allocated, "peak_live_bytes": peak_live, "peak_mem_gib": peak_mem}
    return row, step


def compare(model, args, device, amp_dtype, peak_rate):
    """Transformers' row and ours for one of `--models`, their steps timed in turn."""
    preset, overrides = SIZES[args.size][model.removesuffix("-plain")]
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset(preset, **{"drop_path_rate": 0.0, **overrides})
    label = ",".join([preset] + [f"{key}={value}".replace(" ", "") for key, value in overrides.items()])
    if model == "vit-plain":
        config, label = plain_vit_config(config), label + ",plain"
    reference = transformers_model(config)
    theirs, their_step = prepare(f"transformers {type(reference).__name__}", reference, config, args, device, amp_dtype)
    ours, our_step = prepare(f"hf_simmim {label}", SimMIMForMaskedImageModeling(config), config, args, device,
                             amp_dtype)
    times = time_interleaved({"ours": our_step, "theirs": their_step}, device, args.warmup, args.repeats)
    add_timings(theirs, ours, times, peak_rate)
    return [theirs, ours]


def add_timings(theirs, ours, times, peak_rate):
    """Step time, images/s and MFU of both rows from their median step times, and on ours `ratio`: the median over
    the pairs of consecutive steps of transformers' step time / ours."""
    for row, key in ((theirs, "theirs"), (ours, "ours")):
        seconds = statistics.median(times[key])
        row["step_ms"] = 1000 * seconds
        row["images_per_s"] = row["batch"] / seconds
        row["mfu"] = row["gflop_per_image"] * 1e9 * row["images_per_s"] / peak_rate
    ours["ratio"] = statistics.median(t / o for o, t in zip(times["ours"], times["theirs"]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit", "swin"], choices=["vit", "swin", "vit-plain"],
                        help="vit-plain: ours as a plain ViT, transformers' architecture")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="the tiny presets (CI)")
    size.add_argument("--cpu", action="store_true", help="CPU size: steps of 50 ms or more on 2 cores")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 128 (GPU), 8 (--cpu, --tiny)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps of each model before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps of each model, in turn")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.size = "tiny" if args.tiny else "cpu" if args.cpu else "full"
    small = args.size != "full"
    args.batch_size = args.batch_size or (8 if small else 128)
    args.warmup = args.warmup if args.warmup is not None else (2 if small else 10)
    args.repeats = args.repeats if args.repeats is not None else ({"tiny": 3, "cpu": 15}.get(args.size, 20))
    return args


def format_table(rows, device_name):
    width = max(len(row["model"]) for row in rows)
    lines = [
        f"device: {device_name}",
        f"{'model':<{width}} {'batch':>5} {'ms/step':>8} {'images/s':>9} {'GFLOP/img':>9} {'MFU':>6} {'peak GiB':>8} "
        f"{'alloc MiB/step':>14} {'peak live MiB':>13} {'ratio':>6}",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        peak = "n/a" if row["peak_mem_gib"] != row["peak_mem_gib"] else f"{row['peak_mem_gib']:.2f}"
        lines.append(
            f"{row['model']:<{width}} {row['batch']:>5} {row['step_ms']:>8.1f} {row['images_per_s']:>9.1f} "
            f"{row['gflop_per_image']:>9.3f} {row['mfu']:>6.3f} {peak:>8} "
            f"{row['allocated_bytes_per_step'] / 2**20:>14.2f} {row['peak_live_bytes'] / 2**20:>13.2f} {ratio:>6}"
        )
    lines.append("ratio: median over pairs of consecutive steps of transformers' step time / ours (>1: ours faster)")
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
    threads = f"cpu ({torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    device_name += f", {precision}, measured matmul {peak_rate / 1e12:.3g} TFLOP/s"
    rows = []
    for model in args.models:
        rows += compare(model, args, device, amp_dtype, peak_rate)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_table(rows, device_name))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
