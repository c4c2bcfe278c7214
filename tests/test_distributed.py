"""The shipped accelerate configs do what their names say or are refused; runs end cleanly; two "machines" on
localhost train as one process at twice the batch."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import free_port, tiny_swin, tiny_vit
from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from hf_simmim.training.distributed import check_distributed_launch
from hf_simmim.training.recipes import OPTIMIZER_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate_configs"
RUN_MIM = ROOT / "examples" / "run_mim.py"
MULTI_NODE = ROOT / "examples" / "multi_node.sh"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
QUIET = ["--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--num_reconstruction_images", "0",
         "--report_to", "none"]
SHORT_RUN = ["--max_train_samples", "128", "--max_steps", "4", *QUIET]


def launcher_environment(config_name, monkeypatch):
    """The environment `accelerate launch --config_file NAME` gives its processes (accelerate's own code)."""
    monkeypatch.setattr(sys, "argv", ["accelerate"])  # accelerate's argument checks read sys.argv
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config_name), str(RUN_MIM)])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, environment = prepare_deepspeed_cmd_env(args)
    else:
        environment = prepare_multi_gpu_env(args)
    return args, environment


def losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# ------------------------------------------------------------------------------------ configs and what they ask
@pytest.mark.parametrize("backbone, fields, block", [("vit", tiny_vit(), "ViTBlock"), ("swin", tiny_swin(), "SwinBlock")])
def test_fsdp_config_wraps_the_blocks_of_any_backbone(backbone, fields, block, monkeypatch):
    args, environment = launcher_environment("fsdp.yaml", monkeypatch)
    assert args.use_fsdp and environment["ACCELERATE_USE_FSDP"] == "true"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()  # built from the environment, as in each launched process
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**fields))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {type(module).__name__ for module in model.modules() if policy(module)}
    assert wrapped == {block}


def test_deepspeed_config_parses_into_zero_2_with_the_recipe_clipping(monkeypatch):
    args, environment = launcher_environment("deepspeed_zero2.yaml", monkeypatch)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    ds_config = DeepSpeedPlugin().deepspeed_config
    assert ds_config["zero_optimization"]["stage"] == 2
    assert ds_config["gradient_clipping"] == OPTIMIZER_DEFAULTS["max_grad_norm"]
    assert environment["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_no_example_points_at_a_real_network_address():
    for path in [*CONFIGS.glob("*.yaml"), MULTI_NODE]:
        text = path.read_text()
        assert "main_process_ip:" not in text, path.name
        assert set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text)) <= {"127.0.0.1"}, path.name


# ------------------------------------------------------------------------------------ refusals, before any work
@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_that_this_machine_would_drop_is_refused(variable, monkeypatch):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match="cpu_2proc.yaml|pip install deepspeed"):
        check_distributed_launch(accelerator=False)
    monkeypatch.delenv(variable)
    check_distributed_launch(accelerator=False)


def test_fsdp_launch_on_cpus_stops_before_loading_data(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), str(RUN_MIM),
         "--output_dir", str(tmp_path / "run")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode != 0
    assert "FSDP was requested" in finished.stderr and "cpu_2proc.yaml" in finished.stderr
    assert "loading the dataset" not in finished.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("environment, message", [
    ({"MACHINE_RANK": "1"}, "set MAIN_PROCESS_IP"),
    ({"MACHINE_RANK": "1", "MAIN_PROCESS_IP": "machine-0.invalid"}, "does not resolve"),
])
def test_multi_node_script_fails_fast_without_a_usable_address(environment, message):
    clean = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "MAIN_PROCESS", "MACHINE_RANK"))}
    finished = subprocess.run(["bash", str(MULTI_NODE)], env={**clean, **environment}, capture_output=True,
                              text=True, timeout=30)
    assert finished.returncode != 0 and message in finished.stderr


# ------------------------------------------------------------------------------------ runs on several processes
def test_two_machines_on_localhost_follow_one_process_at_twice_the_batch(tmp_path):
    single = subprocess.run(
        [sys.executable, str(RUN_MIM), *SHORT_RUN, "--per_device_train_batch_size", "32", "--output_dir",
         str(tmp_path / "one")], env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    machine = {**ENV, "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(free_port()), "NUM_MACHINES": "2",
               "PROCESSES_PER_MACHINE": "1", "MIXED_PRECISION": "no", "RENDEZVOUS_TIMEOUT": "120"}
    argv = ["bash", str(MULTI_NODE), *SHORT_RUN, "--per_device_train_batch_size", "16"]
    machines = [
        subprocess.Popen(argv + ["--output_dir", str(tmp_path / f"machine{rank}")],
                         env={**machine, "MACHINE_RANK": str(rank)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300) for process in machines]
    for process, (_, stderr) in zip(machines, outputs):
        assert process.returncode == 0, stderr[-3000:]
    assert "total batch 32" in outputs[0][1]
    assert losses(tmp_path / "machine0") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_two_process_runs_exit_cleanly_every_time(tmp_path):
    """A worker that leaves a live gloo group behind can abort at interpreter exit after a finished run (seen as
    `terminate called without an active exception`); the run destroys the group first. Three runs in a row."""
    for attempt in range(3):
        finished = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
             "--main_process_port", str(free_port()), str(RUN_MIM), *QUIET, "--max_steps", "1",
             "--max_train_samples", "32", "--per_device_train_batch_size", "8",
             "--output_dir", str(tmp_path / f"run{attempt}")],
            env=ENV, capture_output=True, text=True, timeout=150,
        )
        assert finished.returncode == 0, f"attempt {attempt}: " + finished.stderr[-3000:]
        assert "terminate called" not in finished.stderr


def test_no_data_parallel_module_is_alive_when_the_group_is_destroyed(tmp_path):
    """A DDP module alive at destroy_process_group would free the group later, holding the GIL, and deadlock with a
    gloo thread that waits for the GIL to free a finished collective's tensors (a worker that never exits)."""
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(ROOT / "tests" / "destroy_check_worker.py"), str(RUN_MIM), *QUIET, "--max_steps", "1",
         "--max_train_samples", "32", "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=150,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    counts = sorted(re.findall(r"rank (\d): (\d+) DistributedDataParallel alive at destroy", finished.stdout))
    assert counts == [("0", "0"), ("1", "0")], finished.stdout[-3000:]
