"""FSDP on 2 CPU processes (gloo): sharded training follows DDP, and the gathered checkpoint loads.

accelerate cannot run FSDP without an accelerator: `AcceleratorState` switches to FSDP only for the multi-accelerator
distributed types, and on a CPU-only machine the state is MULTI_CPU (or NO), so `accelerate launch --use_fsdp` trains
plain DDP. The scripts refuse that combination (tests/test_distributed.py); here torch's `fully_shard` shards the
modules accelerate's FSDP2 policy picks from `_no_split_modules` (tests/distributed_worker.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from hf_simmim import SimMIMForMaskedImageModeling

WORKER = Path(__file__).with_name("distributed_worker.py")


def run_worker(mode, backbone, out_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), str(WORKER), mode, backbone, str(out_dir)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    return json.loads((out_dir / "run.json").read_text())


@pytest.mark.parametrize("backbone, block", [("vit", "ViTBlock"), ("swin", "SwinBlock")])
def test_fsdp_shards_every_block_and_follows_ddp(backbone, block, tmp_path):
    fsdp = run_worker("fsdp", backbone, tmp_path / "fsdp")
    ddp = run_worker("ddp", backbone, tmp_path / "ddp")

    # one FSDP unit per block of the backbone (`_no_split_modules`), the root sharded too
    assert fsdp["wrapped_types"] == ["FSDP" + block]
    assert fsdp["root_is_fsdp"] and fsdp["all_dtensor"]
    # each rank holds about half of every parameter (dim-0 shards; odd sizes round up on rank 0)
    assert fsdp["full_numel"] / 2 <= fsdp["local_numel"] < fsdp["full_numel"] * 0.6
    assert len(fsdp["losses"]) == 3
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-5)

    sharded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path / "fsdp").state_dict()
    replicated = SimMIMForMaskedImageModeling.from_pretrained(tmp_path / "ddp").state_dict()
    assert sharded.keys() == replicated.keys()
    for name, tensor in replicated.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
