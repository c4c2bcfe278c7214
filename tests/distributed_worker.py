"""One process of a 2-process gloo run on CPU, started by tests/test_fsdp.py through torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py {fsdp|ddp} BACKBONE OUT_DIR

accelerate prepares FSDP only for accelerator process groups (on a CPU-only machine its state is MULTI_CPU and it
wraps the model in DDP), so the FSDP run shards with torch's `fully_shard` directly, wrapping the modules accelerate's
FSDP2 transformer policy picks from the model's `_no_split_modules`, as `accelerate launch` with fsdp.yaml does on
GPUs. Both modes train the same tiny model on the same per-rank batches; rank 0 writes the losses, the wrapping it
saw and the gathered full checkpoint (`save_pretrained`).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from hf_simmim.models.masking import mask_generator_for

STEPS, PER_RANK_BATCH = 3, 4
TINY = {
    "vit": dict(backbone="vit", image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, mask_patch_size=8, drop_path_rate=0.0),
    "swin": dict(backbone="swin", image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                 window_size=4, mask_patch_size=8, drop_path_rate=0.0),
}


def rank_batches(config, rank):
    """The same per-rank batches in both modes: rank r takes rows r*B..(r+1)*B of each global batch."""
    generator = torch.Generator().manual_seed(1234)
    masks = mask_generator_for(config, seed=1234)
    batches = []
    for _ in range(STEPS):
        pixels = torch.randn(2 * PER_RANK_BATCH, 3, 32, 32, generator=generator)
        mask = torch.stack([torch.as_tensor(masks()) for _ in range(2 * PER_RANK_BATCH)])
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        batches.append((pixels[rows], mask[rows].flatten(1).bool()))
    return batches


def shard(model):
    """fully_shard each module accelerate's transformer-based FSDP2 policy selects, then the root."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [name for name, module in model.named_modules() if module is not model and policy(module)]
    for name in reversed(wrapped):
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    return wrapped


def describe_sharding(model, wrapped):
    params = dict(model.named_parameters())
    return {
        "wrapped": wrapped,
        "wrapped_types": sorted({type(model.get_submodule(n)).__name__ for n in wrapped}),
        "root_is_fsdp": isinstance(model, FSDPModule),
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "local_numel": sum(p.to_local().numel() for p in params.values() if isinstance(p, DTensor)),
        "full_numel": sum(p.numel() for p in params.values()),
    }


def main(mode, backbone, out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = SimMIMConfig(**TINY[backbone])
    model = SimMIMForMaskedImageModeling(config)
    report = {}
    if mode == "fsdp":
        report = describe_sharding(model, shard(model))
        trained = model
    else:
        trained = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for pixels, mask in rank_batches(config, rank):
        loss = trained(pixel_values=pixels, bool_masked_pos=mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        losses.append(reduced.item() / dist.get_world_size())
    # Every rank takes part in gathering the full state dict; rank 0 writes it.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        SimMIMForMaskedImageModeling(config).save_pretrained(out_dir, state_dict=state)
        Path(out_dir, "run.json").write_text(json.dumps({"losses": losses, **report}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
