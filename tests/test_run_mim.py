"""End to end: `examples/run_mim.py` as a user runs it (in-process through `main(argv)`, or as a subprocess where
a process must be killed or launched twice by accelerate)."""

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_mim.py"
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}

# Small, fast settings shared by most runs: 64 images, batch 16, 8 steps.
TINY = [
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "16",
    "--per_device_train_batch_size",
    "16",
    "--max_steps",
    "8",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
]


@pytest.fixture(scope="module")
def run_mim():
    return load_script("examples/run_mim.py")


def png_bytes(size=(32, 32), colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path, cells, column="image"):
    import datasets

    features = datasets.Features({column: datasets.Image()})
    rows = [{"bytes": c, "path": None} for c in cells]
    datasets.Dataset.from_dict({column: rows}, features=features).to_parquet(str(path))
    return str(path)


def losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e], [e["learning_rate"] for e in history if "loss" in e]


def weights(output_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        difference = (a[name] - b[name]).abs().max().item()
        assert difference <= atol, f"{name}: max difference {difference}"


# ---------------------------------------------------------------------------------------------- the output folder
def test_run_writes_a_loadable_checkpoint_card_and_pictures(run_mim, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoImageProcessor, AutoModel, AutoModelForMaskedImageModeling

    import hf_simmim  # noqa: F401  (registers the Auto classes)

    out = tmp_path / "run"
    argv = TINY + ["--output_dir", str(out), "--eval_steps", "4", "--save_steps", "4"]
    assert run_mim.main(argv) == 0

    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "reconstruction.png",
        "loss_curve.png",
    ):
        assert (out / name).is_file(), name
    # a picture per evaluation (steps 4 and 8) and at the end
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["step-000004.png", "step-000008.png"]
    assert Image.open(out / "reconstruction.png").size[0] > 4 * 96

    model = AutoModel.from_pretrained(str(out))
    assert type(model).__name__ == "SimMIMModel"
    mim = AutoModelForMaskedImageModeling.from_pretrained(str(out))
    processor = AutoImageProcessor.from_pretrained(str(out))
    assert processor.image_size == mim.config.image_size == 32  # the checkpoint consumes its own preprocessing
    batch = processor([Image.new("RGB", (50, 40), (10, 200, 30))], return_bool_masked_pos=True, return_tensors="pt")
    assert torch.isfinite(mim(**batch).loss)

    card = ModelCard.load(str(out / "README.md"))
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert {"simmim", "masked-image-modeling"} <= set(card.data.tags)
    assert "8 optimizer steps" in card.text
    final_loss = losses(out)[0][-1]
    assert f"{final_loss:.4g}" in card.text
    assert "reconstruction.png" in card.text and "AutoModel.from_pretrained" in card.text

    # images/s and the learning rate are logged with each training loss
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "loss" in e]
    assert logged and all(e["images_per_second"] > 0 and "learning_rate" in e for e in logged)
    assert any("eval_loss" in e for e in history)  # label_names is set inside, so evaluation reports a loss

    summary = capsys.readouterr().out
    assert (
        str(out) in summary and "AutoModel.from_pretrained" in summary and "AutoModelForImageClassification" in summary
    )


def test_losses_and_reconstructions_go_to_tensorboard(run_mim, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = TINY + ["--max_steps", "4", "--eval_steps", "2", "--output_dir", str(out), "--report_to", "tensorboard"]
    assert run_mim.main(argv) == 0
    images, scalars = set(), set()
    for event_file in (out / "runs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0})
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
        scalars |= set(accumulator.Tags()["scalars"])
    assert "reconstruction" in images
    assert {"train/loss", "train/learning_rate", "train/images_per_second", "eval/loss"} <= scalars


@pytest.mark.slow
def test_default_command_runs_and_the_loss_falls(tmp_path):
    """`python examples/run_mim.py` with no argument at all (the README's promise). Its wall time is printed (a
    figure, not an assertion: speed belongs to benchmarks)."""
    start = time.perf_counter()
    result = subprocess.run([PYTHON, str(SCRIPT)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "simmim-pretraining"
    train, _ = losses(out)
    assert train[-1] < train[0] - 0.1, train  # 0.92 -> ~0.72 on the bundled sample
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert (out / "reconstruction.png").is_file() and (out / "loss_curve.png").is_file()
    print(f"default run: {seconds:.1f} s, loss {train[0]:.4f} -> {train[-1]:.4f}")


def test_rerun_into_the_default_output_dir_replaces_it(run_mim, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = TINY + ["--max_steps", "2", "--eval_strategy", "no", "--num_reconstruction_images", "0"]
    assert run_mim.main(argv) == 0
    default = tmp_path / "outputs" / "simmim-pretraining"
    (default / "stale.txt").write_text("from the first run")
    assert run_mim.main(argv) == 0
    assert (default / "model.safetensors").is_file() and not (default / "stale.txt").exists()


def test_a_named_output_dir_holding_a_run_is_refused_unless_overwritten(run_mim, tmp_path):
    out = tmp_path / "mine"
    argv = TINY + [
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--num_reconstruction_images",
        "0",
        "--output_dir",
        str(out),
    ]
    assert run_mim.main(argv) == 0
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        run_mim.main(argv)
    assert run_mim.main(argv + ["--overwrite_output_dir"]) == 0


def test_continue_pretraining_from_a_checkpoint(run_mim, tmp_path):
    quiet = ["--eval_strategy", "no", "--num_reconstruction_images", "0"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_mim.main(TINY + quiet + ["--max_steps", "2", "--output_dir", str(first)]) == 0
    # a zero learning rate keeps the weights: the second run starts from (and ends at) the first one's
    argv = TINY + quiet + ["--max_steps", "1", "--learning_rate", "0", "--model_name_or_path", str(first)]
    assert run_mim.main(argv + ["--output_dir", str(second)]) == 0
    assert_same_weights(weights(first), weights(second), atol=0)
    with pytest.raises(ValueError, match="holds the checkpoint being continued"):
        run_mim.main(argv + ["--output_dir", str(first), "--overwrite_output_dir"])


# ---------------------------------------------------------------------------------------------- refusals
def test_empty_dataset_is_refused_before_training(run_mim, tmp_path):
    data = write_parquet(tmp_path / "empty.parquet", [])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="train split is empty"):
        run_mim.main(TINY + ["--train_dir", data, "--output_dir", str(out)])
    assert not out.exists() or not any(out.iterdir())


def test_missing_image_column_is_refused_with_the_columns(run_mim, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"'picture' is not in the dataset; its columns are \['image', 'label'\]"):
        run_mim.main(TINY + ["--image_column_name", "picture", "--output_dir", str(out)])
    assert not out.exists()


def test_images_smaller_than_the_mask_patch_are_refused(run_mim, tmp_path):
    data = write_parquet(tmp_path / "small.parquet", [png_bytes((6, 6))] * 4 + [png_bytes()] * 4)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"4 of 8 images of the train split are smaller than 8 px \(row 0 is 6x6; row 1 is 6x6; row 2"):
        run_mim.main(TINY + ["--train_dir", data, "--validation_split_percentage", "0", "--output_dir", str(out)])
    assert not out.exists()


def test_non_finite_loss_stops_the_run_naming_the_step(run_mim, tmp_path, caplog):
    """The loss diverges at step 2 (1e38 x the step-1 gradients); no log is due before step 5, but step 2's
    checkpoint is: the loss is read before it is saved, so only step 1's checkpoint exists, named as the one to
    resume from."""
    out = tmp_path / "out"
    argv = TINY + ["--learning_rate", "1e38", "--warmup_steps", "0", "--eval_strategy", "no", "--logging_steps", "5",
                   "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    assert run_mim.main(argv) == 1
    assert "at optimizer step 2 (epoch 0.25); found at step 2" in caplog.text
    assert f"resume from {out / 'checkpoint-1'}, the last checkpoint, saved before step 2" in caplog.text
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()


def jpeg_bytes(size=(400, 300)):
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize(size).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def skip_reports(caplog):
    return [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]


def test_images_that_cannot_be_decoded_are_skipped_counted_and_reported(run_mim, tmp_path, capsys, caplog):
    good = [png_bytes(colour=(i * 7 % 255, 90, 160)) for i in range(30)]
    jpeg = jpeg_bytes()
    # garbage, a truncated PNG and a truncated JPEG (its header is whole: the reduced-scale decode of the crop fails)
    broken = [b"not an image at all", png_bytes()[:40], jpeg[: len(jpeg) // 2]]
    data = write_parquet(tmp_path / "mixed.parquet", good[:10] + broken + good[10:27])
    validation = write_parquet(tmp_path / "validation.parquet", good[:7] + [b"garbage"])
    out = tmp_path / "out"
    argv = TINY + [
        "--train_dir", data, "--validation_dir", validation, "--max_steps", "8", "--per_device_train_batch_size", "8",
        "--output_dir", str(out), "--num_reconstruction_images", "0",
    ]
    with caplog.at_level("WARNING"):
        assert run_mim.main(argv) == 0  # 29 images after the check, batch 8, 8 steps: two epochs through the rest
    # each image reported once: by the header check (garbage), or by the first read (truncated pixels)
    reports = skip_reports(caplog)
    assert len(reports) == 4
    for where in ("train row 10", "train row 11", "train row 12", "validation row 7"):
        assert sum(where in report for report in reports) == 1, where
    captured = capsys.readouterr()
    # distinct images, not skips per epoch or per evaluation
    assert "images skipped (cannot be decoded): 3 training, 1 validation" in captured.out
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 9))
    assert "| Images skipped (could not be decoded) | 3 training, 1 validation |" in (out / "README.md").read_text()
    results = json.loads((out / "all_results.json").read_text())
    assert (results["train_skipped_images"], results["eval_skipped_images"]) == (3, 1) and "eval_loss" in results


def test_without_validation_pictures_show_training_rows_and_batches_of_one_train(run_mim, tmp_path, capsys, caplog):
    good = [png_bytes(colour=(i * 30, 90, 160)) for i in range(6)]
    jpeg = jpeg_bytes()
    # row 1: a whole header but truncated pixels, among the pictures' 4 rows; row 4: garbage, left out by the check
    cells = good[:1] + [jpeg[: len(jpeg) // 2]] + good[1:3] + [b"garbage"] + good[3:]
    data = write_parquet(tmp_path / "train.parquet", cells)
    out = tmp_path / "out"
    argv = TINY + [
        "--train_dir", data, "--validation_split_percentage", "0", "--per_device_train_batch_size", "1",
        "--max_steps", "14", "--num_reconstruction_images", "4", "--output_dir", str(out),
    ]
    with caplog.at_level("WARNING"):
        assert run_mim.main(argv) == 0  # 7 rows after the check, one a step: 2 epochs, row 1 in every one
    reports = skip_reports(caplog)
    assert len(reports) == 2  # row 1 found by the pictures is not reported again by training
    assert "train row 4" in reports[0] and "train row 1" in reports[1]
    assert "images skipped (cannot be decoded): 2 training, 0 validation" in capsys.readouterr().out
    assert (out / "reconstruction.png").exists()


def test_a_bug_in_augmentation_stops_the_run_with_its_error(run_mim, tmp_path, monkeypatch):
    from hf_simmim.data.augmentation import AugmentationPreset

    def broken(self, image, rng=None):
        raise RuntimeError("bug in augmentation")

    monkeypatch.setattr(AugmentationPreset, "augment", broken)
    with pytest.raises(RuntimeError, match="bug in augmentation"):
        run_mim.main(TINY + ["--output_dir", str(tmp_path / "out"), "--num_reconstruction_images", "0"])


# ---------------------------------------------------------------------------------------------- push to hub
class FakeHubApi:
    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, run_as_future=False, **kwargs):
        self.uploads.append(
            {
                "repo_id": repo_id,
                "files": sorted(os.listdir(folder_path)),
                "card": Path(folder_path, "README.md").read_text(),
            }
            if os.path.exists(os.path.join(folder_path, "README.md"))
            else {"repo_id": repo_id, "files": sorted(os.listdir(folder_path)), "card": None}
        )
        if run_as_future:
            future = Future()
            future.set_result(None)
            return future
        return None


def test_push_to_hub_uploads_the_output_folder_with_the_simmim_card(run_mim, tmp_path, monkeypatch):
    import transformers.trainer

    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    out = tmp_path / "out"
    argv = TINY + [
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--output_dir",
        str(out),
        "--push_to_hub",
        "--hub_model_id",
        "someone/simmim-tiny",
        "--hub_strategy",
        "end",
    ]
    assert run_mim.main(argv) == 0
    final = api.uploads[-1]
    assert final["repo_id"] == "someone/simmim-tiny"
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "reconstruction.png"} <= set(
        final["files"]
    )
    assert "someone/simmim-tiny" in final["card"] and "SimMIM" in final["card"]  # ours, not Trainer's generic card


# ---------------------------------------------------------------------------------------------- resume after kill
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import hf_simmim.training as training

    kill_at = int(os.environ["KILL_AT_STEP"])
    original = training.SimMIMTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, as a killed job
        return original(self, *args, **kwargs)

    training.SimMIMTrainer.training_step = training_step
    sys.path.insert(0, os.path.dirname(sys.argv[1]))
    import run_mim
    sys.exit(run_mim.main(sys.argv[2:]))
    """
)


def test_resume_after_kill_matches_an_uninterrupted_run(run_mim, tmp_path):
    # 128 images, batch 16: 8 steps an epoch; 20 steps; checkpoints every 6; killed at step 14 (epoch 1.75),
    # resumed from checkpoint-12 (mid epoch 1). Random crops, flips and masks are on.
    argv = [
        "--max_train_samples",
        "128",
        "--per_device_train_batch_size",
        "16",
        "--max_steps",
        "20",
        "--logging_steps",
        "1",
        "--save_steps",
        "6",
        "--eval_steps",
        "10",
        "--max_eval_samples",
        "16",
        "--report_to",
        "none",
        "--num_reconstruction_images",
        "0",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_mim.main(argv + ["--output_dir", str(full)]) == 0

    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    result = subprocess.run(
        [PYTHON, str(killer), str(SCRIPT), *argv, "--output_dir", str(killed)],
        env={**ENV, "KILL_AT_STEP": "14"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -9, result.stderr[-2000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert not (killed / "model.safetensors").exists()

    assert run_mim.main(argv + ["--output_dir", str(killed), "--resume_from_checkpoint", "last"]) == 0
    full_losses, full_lrs = losses(full)
    resumed_losses, resumed_lrs = losses(killed)
    assert len(resumed_losses) == len(full_losses) == 20
    assert resumed_lrs == pytest.approx(full_lrs, rel=1e-9)  # same schedule position
    assert resumed_losses[12:] == pytest.approx(full_losses[12:], rel=1e-5)  # same data, same masks
    assert_same_weights(weights(full), weights(killed), atol=1e-6)


# ---------------------------------------------------------------------------------------------- distributed
def test_gradient_accumulation_follows_the_trajectory_of_the_full_batch(run_mim, tmp_path):
    """2 accumulation steps x batch 8 == batch 16: the per-batch mean loss is averaged over the accumulation steps
    (never rescaled by a token count), and the learning rate follows the total batch."""
    common = TINY + ["--max_steps", "4", "--eval_strategy", "no", "--save_strategy", "no"]
    common += ["--num_reconstruction_images", "0"]
    full, accumulated = tmp_path / "full", tmp_path / "accumulated"
    assert run_mim.main(common + ["--per_device_train_batch_size", "16", "--output_dir", str(full)]) == 0
    argv = common + ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"]
    assert run_mim.main(argv + ["--output_dir", str(accumulated)]) == 0
    (full_losses, full_lrs), (acc_losses, acc_lrs) = losses(full), losses(accumulated)
    assert acc_lrs == pytest.approx(full_lrs, rel=1e-9)
    assert acc_losses == pytest.approx(full_losses, rel=1e-5)
    assert_same_weights(weights(full), weights(accumulated), atol=1e-5)


def test_two_processes_follow_the_loss_trajectory_of_one_with_twice_the_batch(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPU (2 gloo CPU processes, made
    distributed by use_cpu being set inside) x batch 16 == 1 process x batch 32: same losses, learning rates and
    final weights. Crops and masks are drawn per (seed, epoch, row), so they are the same in both runs."""
    common = [
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--max_train_samples",
        "128",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--num_reconstruction_images",
        "0",
        "--report_to",
        "none",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [PYTHON, str(SCRIPT), *common, "--per_device_train_batch_size", "32", "--output_dir", str(one)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launched = subprocess.run(
        [
            PYTHON,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
            str(SCRIPT),
            *common,
            "--per_device_train_batch_size",
            "16",
            "--output_dir",
            str(two),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "total batch 32" in launched.stderr  # one distributed run, not two independent ones
    one_losses, one_lrs = losses(one)
    two_losses, two_lrs = losses(two)
    assert len(one_losses) == len(two_losses) == 6
    assert two_lrs == pytest.approx(one_lrs, rel=1e-9)
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    assert_same_weights(weights(one), weights(two), atol=1e-5)


def test_a_resumed_run_keeps_its_planned_length_and_schedule(run_mim, tmp_path):
    # Planned for 8 steps; resumed from step 4 by a command without --max_steps (the default is 30 epochs): it
    # still ends at step 8 on the same learning rates. Another --max_steps is refused before anything loads.
    out = tmp_path / "run"
    argv = TINY + ["--save_steps", "4", "--eval_steps", "4", "--num_reconstruction_images", "0"]
    assert run_mim.main(argv + ["--output_dir", str(out)]) == 0
    _, planned_lrs = losses(out)
    without_length = [token for i, token in enumerate(argv) if "--max_steps" not in argv[max(i - 1, 0) : i + 1]]
    resume = ["--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoint-4")]
    with pytest.raises(ValueError, match="--max_steps 12 asks for another length"):
        run_mim.main(without_length + resume + ["--max_steps", "12"])
    assert run_mim.main(without_length + resume) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert losses(out)[1] == pytest.approx(planned_lrs, rel=1e-9)
