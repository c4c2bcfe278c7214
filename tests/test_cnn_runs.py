"""The CNN presets end to end: pretraining with the example script, then fine-tuning its checkpoint; and two
processes with synchronised (masked) batch norm training as one process at twice the batch, which they do not
without it."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import load_script, tiny_resnet
from torch.nn.parallel import DistributedDataParallel

from hf_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from hf_simmim.models.modeling_conv_masking import convert_to_sync_batchnorm

FEW_STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none"]


@pytest.mark.parametrize("preset, overrides", [
    ("resnet-tiny-test", None), ("convnextv2-tiny-test", 'conv_masking="token",decoder_type="simmim"'),
])
def test_pretrain_then_fine_tune(preset, overrides, tmp_path):
    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    argv = ["--preset", preset, "--max_train_samples", "16", "--max_eval_samples", "8", *FEW_STEPS]
    argv += ["--config_overrides", overrides] if overrides else []
    assert load_script("examples/run_mim.py").main([*argv, "--output_dir", str(pretrained)]) == 0
    source = SimMIMForMaskedImageModeling.from_pretrained(pretrained)
    assert (pretrained / "reconstruction.png").is_file()

    argv = ["--model_name_or_path", str(pretrained), "--samples_per_class", "2", "--max_eval_samples", "10",
            "--eval_strategy", "no", "--save_strategy", "no", *FEW_STEPS]
    assert load_script("examples/run_finetune.py").main([*argv, "--output_dir", str(tuned)]) == 0
    model = SimMIMForImageClassification.from_pretrained(tuned)
    assert model.config.backbone == source.config.backbone
    start, end = source.simmim.encoder.stem.convolution.weight, model.simmim.encoder.stem.convolution.weight
    assert (end - start).norm() < 0.1 * start.norm()  # started from the pretrained weights
    assert 0.0 <= json.loads((tuned / "all_results.json").read_text())["eval_top1"] <= 1.0

    # the frozen encoder's pooled stage map serves k-NN as ViT's tokens do
    argv = ["--model_name_or_path", str(pretrained), "--mode", "knn", "--samples_per_class", "2",
            "--max_eval_samples", "10", "--report_to", "none", "--output_dir", str(tmp_path / "knn")]
    assert load_script("examples/run_finetune.py").main(argv) == 0
    assert 0.0 <= json.loads((tmp_path / "knn" / "all_results.json").read_text())["eval_top1"] <= 1.0


# ---------------------------------------------------------------------------------------------- two processes
STEPS, PER_RANK_BATCH = 3, 4


def global_batches(config):
    """Random images and SimMIM masks; every mask hides the same number of squares, so the mean of the two halves'
    losses is the loss of the whole batch."""
    generator = torch.Generator().manual_seed(0)
    masks = SimMIMMaskGenerator.from_config(config, seed=0)
    for _ in range(STEPS):
        pixels = torch.randn(2 * PER_RANK_BATCH, 3, 32, 32, generator=generator)
        yield pixels, torch.stack([torch.from_numpy(masks()) for _ in range(2 * PER_RANK_BATCH)]).bool()


def train(rows, distributed, synchronised):
    """The losses of a few AdamW steps on `rows` of each global batch, averaged over the processes."""
    torch.manual_seed(0)
    config = SimMIMConfig(**tiny_resnet())
    model = SimMIMForMaskedImageModeling(config).train()
    if synchronised:
        # every batch norm, the encoder's and the decoder's
        assert convert_to_sync_batchnorm(model) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    trained = DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    losses = []
    for pixels, masks in global_batches(config):
        loss = trained(pixel_values=pixels[rows], bool_masked_pos=masks[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean.item())
    return losses


def _worker(rank, init_file, result_dir, synchronised):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    losses = train(rows, distributed=True, synchronised=synchronised)
    if rank == 0:
        torch.save(losses, os.path.join(result_dir, "losses.pt"))
    dist.destroy_process_group()


def two_process_losses(tmp_path, synchronised):
    # forked, not spawned: the workers need nothing but what this process has already imported
    mp.start_processes(
        _worker, args=(str(tmp_path / f"init-{synchronised}"), str(tmp_path), synchronised), nprocs=2,
        start_method="fork",
    )
    return torch.load(tmp_path / "losses.pt")


def test_two_processes_with_synchronised_batch_norm_train_as_one_at_twice_the_batch(tmp_path):
    one = train(slice(None), distributed=False, synchronised=False)
    assert two_process_losses(tmp_path, synchronised=True) == pytest.approx(one, rel=1e-5)
    # each process normalising over its own half is another computation (here 4e-5 to 2.5e-4 apart)
    unsynchronised = two_process_losses(tmp_path, synchronised=False)
    assert max(abs(a - b) / b for a, b in zip(unsynchronised, one)) > 5e-5


def test_run_mim_on_two_processes_synchronises_batch_norms_and_follows_one_process(tmp_path):
    """`accelerate launch` x 2 CPU processes x batch 8 of a ResNet == 1 process x batch 16: the trainer makes its
    masked batch norms synchronised (and says so), so their statistics are those of the whole batch."""
    import subprocess
    import sys

    from conftest import REPO_ROOT, free_port

    script = str(REPO_ROOT / "examples" / "run_mim.py")
    common = ["--preset", "resnet-tiny-test", "--max_train_samples", "64", "--max_steps", "3", "--logging_steps", "1",
              "--eval_strategy", "no", "--save_strategy", "no", "--num_reconstruction_images", "0", "--report_to",
              "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    runs = {
        "one": [sys.executable, script, *common, "--per_device_train_batch_size", "16"],
        "two": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port),
                script, *common, "--per_device_train_batch_size", "8"],
    }
    logs, losses = {}, {}
    for name, command in runs.items():
        finished = subprocess.run([*command, "--output_dir", str(tmp_path / name)], env=env, capture_output=True,
                                  text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-3000:]
        logs[name] = finished.stderr
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        losses[name] = [entry["loss"] for entry in history if "loss" in entry]
    assert "Synchronising" in logs["two"] and "Synchronising" not in logs["one"]
    assert len(losses["two"]) == 3
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
