"""What a launcher asked for, checked against what this machine can do, before any work; and a clean exit.

`accelerate launch` passes its config to the processes as environment variables (`ACCELERATE_USE_FSDP`,
`ACCELERATE_USE_DEEPSPEED`, ...). Some of those requests accelerate cannot honour on every machine, and it then
quietly trains something else: without an accelerator its state is MULTI_CPU (gloo) or NO, and
`AcceleratorState` switches to FSDP only for the multi-accelerator types, so `--use_fsdp` on CPUs trains plain DDP
with every parameter replicated. A run that would silently do something other than its config says is refused here.
"""

import gc
import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

CPU_MULTI_PROCESS_CONFIG = "examples/accelerate_configs/cpu_2proc.yaml"
# what torchrun sets for each process it starts (besides TORCHELASTIC_*; MPI launchers' variables by prefix)
LAUNCHER_VARIABLES = {
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
}


def requested_by_launcher(name):
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def check_distributed_launch(accelerator):
    """Refuse, naming the cause and the fix, a launch whose sharding this machine would silently drop.

    `accelerator`: whether the run has a GPU or another accelerator (not `use_cpu`)."""
    if requested_by_launcher("ACCELERATE_USE_FSDP") and not accelerator:
        raise ValueError(
            "FSDP was requested (accelerate launch --use_fsdp / distributed_type: FSDP) on a machine without a GPU: "
            "accelerate prepares FSDP only for accelerator process groups and would train plain DDP with every "
            f"parameter replicated. Run on GPUs, or use {CPU_MULTI_PROCESS_CONFIG} for a multi-process CPU run."
        )
    if requested_by_launcher("ACCELERATE_USE_DEEPSPEED"):
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "DeepSpeed was requested (distributed_type: DEEPSPEED) but is not installed: pip install deepspeed."
            )
        if not accelerator:
            raise ValueError(
                "DeepSpeed was requested on a machine without a GPU: its ZeRO configs need accelerators. Use "
                f"{CPU_MULTI_PROCESS_CONFIG} for a multi-process CPU run."
            )


def single_process_environment():
    """This process's environment without what a launcher (torchrun, `accelerate launch`) set for it: a command
    started with it runs as a process of its own, not as a member of this run's process group."""
    return {
        name: value for name, value in os.environ.items()
        if name not in LAUNCHER_VARIABLES
        and not name.startswith(("TORCHELASTIC_", "ACCELERATE_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_", "PMI_"))
    }


def end_distributed_run():
    """Destroy the default process group, after the run's objects are gone: call it once the run's function has
    returned, on every process.

    A worker that leaves a live gloo group to interpreter exit can abort (`terminate called without an active
    exception`), so the group is destroyed. But a DistributedDataParallel module still alive then (a Trainer keeps
    its wrapped model) would hold the group's last reference: freeing it later, the module's reducer joins gloo's
    threads while holding the GIL, and a gloo thread still freeing a finished collective's tensors waits for the
    GIL: a deadlock (seen in about 1 of 12 two-process runs under load). Collected first, the modules leave the
    group's last reference to Python, which frees it without the GIL. No barrier before: its work, still being
    freed on a gloo thread, was the one that waited for the GIL; every run's last collective has already
    brought the processes together."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()  # a Trainer and its wrapped model sit in reference cycles
        torch.distributed.destroy_process_group()
