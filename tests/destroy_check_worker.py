"""One process of a 2-process run of an example script, started by tests/test_distributed.py through torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/destroy_check_worker.py SCRIPT ARGS...

runs SCRIPT as `__main__` and prints, when the script destroys the process group, how many DistributedDataParallel
modules are still alive: any one of them would free the group later, holding the GIL (see
`hf_simmim.training.distributed.end_distributed_run`).
"""

import gc
import runpy
import sys

import torch.distributed
from torch.nn.parallel import DistributedDataParallel

destroy_process_group = torch.distributed.destroy_process_group


def counting_destroy_process_group(*args, **kwargs):
    alive = sum(isinstance(thing, DistributedDataParallel) for thing in gc.get_objects())
    print(f"rank {torch.distributed.get_rank()}: {alive} DistributedDataParallel alive at destroy", flush=True)
    destroy_process_group(*args, **kwargs)


torch.distributed.destroy_process_group = counting_destroy_process_group
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
