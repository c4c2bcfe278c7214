"""The stop on a non-finite training loss: checked on the device without a sync per step, read where Trainer
synchronises anyway (logging, evaluation, checkpoint steps, the end), naming the first bad step; no checkpoint ever
holds a step taken after it; processes agree on the step."""

import collections
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import REPO_ROOT, free_port
from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.data.image_ops import normalize_pixel_batch
from hf_simmim.data.transforms import collate_fn
from hf_simmim.training.schedules import SimMIMRecipe
from hf_simmim.training.trainer import (
    NonFiniteLossError,
    NonFiniteLossRecord,
    SimMIMTrainer,
    earliest_nonfinite_loss,
)

ROWS = 12


def tiny_model():
    torch.manual_seed(0)
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit-tiny-test"))


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, logging_steps=1,
        report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True, remove_unused_columns=False,
        label_names=["bool_masked_pos"], disable_tqdm=True, weight_decay=0.05, seed=0,
        train_sampling_strategy="sequential",
    )
    values.update(overrides)
    return TrainingArguments(**values)


class NaNAtStep(torch.utils.data.Dataset):
    """12 rows of valid inputs, except NaN pixels in the rows of the `bad_step`-th batch (batch size 2);
    `uint8=True`: the same images as uint8 (no NaN), for the trainer's normalisation on the device."""

    def __init__(self, bad_step=None, uint8=False):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randint(0, 256, (ROWS, 3, 32, 32), generator=generator, dtype=torch.uint8)
        if not uint8:
            processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
            self.pixels = normalize_pixel_batch(self.pixels, processor.image_mean, processor.image_std)
        if bad_step is not None:
            self.pixels[2 * (bad_step - 1) : 2 * bad_step] = float("nan")
        self.masks = torch.rand(ROWS, 8, 8, generator=generator) > 0.5

    def __len__(self):
        return ROWS

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "bool_masked_pos": self.masks[index]}


class Snapshot(TrainerCallback):
    """The weights after each optimizer step, by step."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


def nan_run(tmp_path, bad_step, **overrides):
    snapshot = Snapshot()
    trainer = SimMIMTrainer(
        model=tiny_model(), args=training_args(tmp_path, **overrides), train_dataset=NaNAtStep(bad_step),
        data_collator=collate_fn,
    )
    trainer.add_callback(snapshot)
    with pytest.raises(NonFiniteLossError) as raised:
        trainer.train()
    return raised.value, trainer, snapshot


# ---------------------------------------------------------------------------------------------- the stop
def test_a_nan_loss_stops_at_the_next_logging_step_naming_the_first_bad_step(tmp_path):
    error, trainer, snapshot = nan_run(tmp_path, bad_step=3, max_steps=6, logging_steps=5)
    assert (error.step, error.found_at, error.process, error.checkpoint) == (3, 5, 0, None)
    assert error.epoch == pytest.approx(2 / 6) and error.loss != error.loss  # epoch when step 3 began; NaN
    assert "at optimizer step 3 (epoch 0.33); found at step 5" in str(error)
    assert "steps 3 to 5 were applied to the weights in memory" in str(error)
    assert "no checkpoint was saved before it" in str(error)
    assert sorted(snapshot.weights) == [1, 2, 3, 4, 5]  # stopped at step 5, before logging it
    assert not any("loss" in entry for entry in trainer.state.log_history)
    assert all(torch.isfinite(p).all() for p in snapshot.weights[2].values())


def test_no_checkpoint_holds_a_step_after_the_nan_and_the_error_names_the_last_good_one(tmp_path):
    error, _, snapshot = nan_run(
        tmp_path, bad_step=3, max_steps=6, logging_steps=100, save_strategy="steps", save_steps=2
    )
    out = tmp_path / "out"
    assert (error.step, error.found_at) == (3, 4)  # read before saving step 4's checkpoint, which is not written
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert error.checkpoint == str(out / "checkpoint-2")
    assert f"resume from {out / 'checkpoint-2'}, the last checkpoint, saved before step 3" in str(error)
    saved = SimMIMForMaskedImageModeling.from_pretrained(out / "checkpoint-2")
    for name, param in saved.named_parameters():
        assert torch.equal(param, snapshot.weights[2][name]), name


def test_a_nan_at_the_bad_step_itself_is_found_there_when_it_logs(tmp_path):
    error, _, snapshot = nan_run(tmp_path, bad_step=3, logging_steps=1)
    assert (error.step, error.found_at) == (3, 3)
    assert "step 3 was applied to the weights in memory" in str(error)
    assert sorted(snapshot.weights) == [1, 2, 3]


def test_a_nan_after_the_last_logging_step_is_found_at_the_end(tmp_path):
    error, _, snapshot = nan_run(tmp_path, bad_step=2, max_steps=4, logging_steps=100)
    assert (error.step, error.found_at) == (2, 4)
    assert sorted(snapshot.weights) == [1, 2, 3, 4]


def test_a_new_train_call_starts_a_new_record(tmp_path):
    """A trainer that stopped on a NaN, given finite data, trains again (the old record does not stop it)."""
    _, trainer, _ = nan_run(tmp_path, bad_step=1, max_steps=2)
    trainer.model.load_state_dict(tiny_model().state_dict())
    trainer.train_dataset = NaNAtStep(bad_step=None)
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_nan_stop_can_be_turned_off(tmp_path):
    trainer = SimMIMTrainer(
        model=tiny_model(), args=training_args(tmp_path, max_steps=2), train_dataset=NaNAtStep(bad_step=1),
        data_collator=collate_fn, recipe=SimMIMRecipe(stop_on_nonfinite_loss=False),
    )
    trainer.train()  # trains on NaN, as plain Trainer would
    assert trainer.nonfinite_losses is None
    assert any(torch.isnan(p).any() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------------------------- processes agree
def test_processes_agree_on_the_earliest_step_lowest_process_first():
    assert earliest_nonfinite_loss([0, 0], [[0.5, 1.0], [0.5, 2.0]]) is None
    assert earliest_nonfinite_loss([0, 7, 5, 5], [[0, 0], [1.0, 3.0], [0.5, float("inf")], [0.5, 2.0]]) == (
        5, 0.5, float("inf"), 2,
    )


def threads_gather(world_size):
    """`gather_for(rank)`: an all-gather among `world_size` threads (each thread's tensor, concatenated in rank
    order), standing for `Accelerator.gather` across processes."""
    barrier, slots = threading.Barrier(world_size, timeout=10), [None] * world_size

    def gather_for(rank):
        def gather(tensor):
            slots[rank] = tensor
            barrier.wait()
            gathered = torch.cat(slots)
            barrier.wait()
            return gathered

        return gather

    return gather_for


def test_records_read_together_report_the_first_bad_step_of_any_process():
    """Process 0 saw only finite losses until step 3, process 1 a NaN at step 2: both read step 2 on process 1."""
    records = [NonFiniteLossRecord(), NonFiniteLossRecord()]
    for step, losses in enumerate([(1.0, 1.5), (0.9, float("nan")), (float("inf"), 2.0)], start=1):
        for record, loss in zip(records, losses):
            record.record(torch.tensor(loss), step, epoch=step / 4)
    gather_for = threads_gather(2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        found = list(pool.map(lambda rank: records[rank].read(gather_for(rank)), [0, 1]))
    for step, epoch, loss, process in found:
        assert (step, epoch, process) == (2, 0.5, 1) and math.isnan(loss)


def test_records_with_only_finite_losses_read_nothing():
    records = [NonFiniteLossRecord(), NonFiniteLossRecord()]
    for record in records:
        record.record(torch.tensor(1.0), 1, epoch=0.0)
    gather_for = threads_gather(2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda rank: records[rank].read(gather_for(rank)), [0, 1])) == [None, None]


def two_process_worker(output_dir):
    """One of 2 processes (`accelerate launch`, this file as the script): NaN pixels reach process 1 alone at step 2
    (sequential batches of 2 alternate between the processes: rows 6-7 are process 1's second batch); every loss
    is NaN from step 3 on (the gradients are averaged). Each process writes what its error said."""
    error, trainer, _ = nan_run(Path(output_dir), bad_step=4, max_steps=5, logging_steps=3)
    rank = trainer.args.process_index
    found = {"step": error.step, "found_at": error.found_at, "process": error.process, "message": str(error)}
    (Path(output_dir) / f"error-{rank}.json").write_text(json.dumps(found))


@pytest.mark.slow
def test_two_processes_stop_together_naming_the_first_bad_step_of_either(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port",
         str(free_port()), __file__, str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"error-{rank}.json").read_text())
        assert (found["step"], found["found_at"], found["process"]) == (2, 3, 1), found
        assert "at optimizer step 2 (epoch 0.33) on process 1; found at step 3" in found["message"]


# ---------------------------------------------------------------------------------------------- no sync per step
SYNCING_METHODS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
}
HOST_DATA_FACTORIES = {torch.tensor, torch.as_tensor}


class SyncCounter(TorchFunctionMode):
    """Counts, by name, the calls that make an accelerator wait for its queued work: reading a tensor's value on
    the host, and copying host data to the device (`torch.tensor(data, device=...)`: a blocking copy)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host_copy = func in HOST_DATA_FACTORIES and "device" in kwargs and not isinstance(args[0], torch.Tensor)
        if func in SYNCING_METHODS or host_copy:
            self.counts[func.__name__] += 1
        return func(*args, **kwargs)


class OldStyleCheck(SimMIMTrainer):
    """The check this package had: a device-to-host read of the loss at every step (the counter must see it)."""

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if (~torch.isfinite(loss)).item():
            raise RuntimeError("non-finite loss")
        return loss


def count_syncs(trainer_class, tmp_path, max_steps, monkeypatch, uint8=False):
    """Synchronising calls made by `trainer_class(...).train()` for `max_steps` steps with no logging before the
    end, collectives (`Accelerator.gather` / `reduce`) included."""
    from accelerate import Accelerator

    counter = SyncCounter()
    for name in ("gather", "reduce"):
        original = getattr(Accelerator, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter.counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Accelerator, name, counted)
    # logging_nan_inf_filter (on by default) makes Trainer read every loss on the host (`isnan(loss) or ...`)
    args = training_args(
        tmp_path / f"{trainer_class.__name__}-{max_steps}", max_steps=max_steps, logging_steps=100,
        logging_nan_inf_filter=False,
    )
    extra = {"processing_class": SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))}
    trainer = trainer_class(
        model=tiny_model(), args=args, train_dataset=NaNAtStep(uint8=uint8 and trainer_class is not Trainer),
        data_collator=collate_fn, **(extra if trainer_class is not Trainer else {}),
    )
    with counter:
        trainer.train()
    monkeypatch.undo()
    return counter.counts


def syncs_per_step(trainer_class, tmp_path, monkeypatch, uint8=False):
    """The synchronising calls that grow with the number of steps: counts over 5 steps minus counts over 2."""
    few = count_syncs(trainer_class, tmp_path, 2, monkeypatch, uint8)
    more = count_syncs(trainer_class, tmp_path, 5, monkeypatch, uint8)
    return {name: (more[name] - few[name]) / 3 for name in more.keys() | few.keys() if more[name] != few[name]}


@pytest.mark.parametrize("uint8", [False, True], ids=["float-pixels", "uint8-pixels"])
def test_the_trainer_adds_no_synchronising_call_per_step_to_plain_trainer(tmp_path, monkeypatch, uint8):
    reference = syncs_per_step(Trainer, tmp_path, monkeypatch)  # transformers' own per-step reads
    ours = syncs_per_step(SimMIMTrainer, tmp_path, monkeypatch, uint8)
    added = {name: count - reference.get(name, 0) for name, count in ours.items() if count > reference.get(name, 0)}
    assert added == {}, f"SimMIMTrainer per step: {ours}; transformers.Trainer per step: {reference}"
    # the counter sees a per-step read where there is one
    old = syncs_per_step(OldStyleCheck, tmp_path, monkeypatch)
    assert old.get("item", 0) - reference.get("item", 0) == 1, (old, reference)


def test_the_scripts_do_not_read_every_loss_on_the_host():
    """transformers' `logging_nan_inf_filter` (on by default) reads each step's loss on the host, the sync the check
    above avoids: the scripts' defaults turn it off."""
    from hf_simmim.training.arguments import parse_finetune_arguments, parse_run_arguments

    assert parse_run_arguments([])[3].logging_nan_inf_filter is False
    assert parse_finetune_arguments(["--model_name_or_path", "ckpt"])[3].logging_nan_inf_filter is False


if __name__ == "__main__":
    from hf_simmim.training.distributed import end_distributed_run

    two_process_worker(sys.argv[1])
    end_distributed_run()
