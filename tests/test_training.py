"""The SimMIM recipe on Trainer: parameter groups, learning-rate scaling, schedules, the transform inside Trainer,
callbacks, argument defaults, dataset loading and checks."""

import io
import math
import multiprocessing

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback, TrainingArguments

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.training.runs import (
    apply_learning_rate,
    load_pretraining_model,
    prepare_output_dir,
    resolve_recipe_defaults,
    skipped_image_counts,
)
from hf_simmim.training.arguments import parse_run_arguments, simmim_training_defaults
from hf_simmim.data.transforms import SeededImageDataset, SimMIMPretrainingDataset, SimMIMTransform, collate_fn
from hf_simmim.data.checks import check_image_dataset
from hf_simmim.data.loading import detect_image_column, load_image_datasets
from hf_simmim.training.callbacks import EpochCallback, ThroughputCallback, add_callback_first
from hf_simmim.training.trainer import SimMIMTrainer
from hf_simmim.training.schedules import SimMIMLRLambda, SimMIMRecipe, get_simmim_scheduler
from hf_simmim.training.optim import scale_learning_rate


def tiny_model(preset="vit-tiny-test"):
    torch.manual_seed(0)
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset))


def training_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        label_names=["bool_masked_pos"],
        disable_tqdm=True,
        weight_decay=0.05,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="module")
def sample():
    train, validation = load_image_datasets()
    return train.select(range(32)), validation.select(range(16))


def pretraining_dataset(raw, train=True, seed=0):
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    return SimMIMPretrainingDataset(raw, SimMIMTransform(processor, train=train, keep_columns=()), seed=seed)


def png(size=(32, 32), colour=(10, 120, 240)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(cells, column="image"):
    features = datasets.Features({column: datasets.Image()})
    return datasets.Dataset.from_dict({column: [{"bytes": c, "path": None} for c in cells]}, features=features)


# ---------------------------------------------------------------------------------------------- learning rate
def test_linear_scaling_rule():
    assert scale_learning_rate(2e-4, 2048) == pytest.approx(8e-4)  # the paper's Swin-B at batch 2048
    assert scale_learning_rate(1e-4, 512) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="total_batch_size"):
        scale_learning_rate(1e-4, 0)


def test_learning_rate_follows_the_total_batch_unless_given(tmp_path):
    args = training_args(tmp_path, per_device_train_batch_size=64, gradient_accumulation_steps=4)
    _, _, recipe_args, _, _ = parse_run_arguments(["--base_learning_rate", "2e-4"])
    recipe, rule = apply_learning_rate(args, resolve_recipe_defaults(recipe_args, _model_args()), given=set())
    assert args.learning_rate == pytest.approx(2e-4 * 256 / 512)
    assert recipe.warmup_lr == pytest.approx(1e-6 * 256 / 512) and recipe.min_lr == pytest.approx(1e-5 * 256 / 512)
    assert "x total batch 256 / 512" in rule

    args = training_args(tmp_path, learning_rate=3e-3)
    recipe, rule = apply_learning_rate(args, recipe_args, given={"learning_rate"})
    assert args.learning_rate == 3e-3
    assert recipe.warmup_lr == pytest.approx(1e-6 * 3e-3 / 2e-4)  # same ratios to the peak as the recipe


def test_multistep_schedule_warms_up_for_10_of_800_epochs(tmp_path):
    _, _, recipe_args, args, given = parse_run_arguments(["--lr_schedule", "multistep", "--output_dir", str(tmp_path)])
    assert args.warmup_steps == 0.1  # the 100-epoch configs' 10 epochs
    apply_learning_rate(args, resolve_recipe_defaults(recipe_args, _model_args()), given)
    assert args.get_warmup_steps(8000) == 100  # 10 of 800 epochs
    _, _, recipe_args, args, given = parse_run_arguments(["--lr_schedule", "multistep", "--warmup_steps", "7"])
    apply_learning_rate(args, resolve_recipe_defaults(recipe_args, _model_args()), given)
    assert args.warmup_steps == 7  # a given flag wins


def _model_args(**values):
    from hf_simmim.training.arguments import ModelArguments

    return ModelArguments(**values)


def test_recipe_defaults_follow_the_official_configs():
    _, _, recipe_args, _, _ = parse_run_arguments(["--lr_schedule", "multistep"])
    resolve_recipe_defaults(recipe_args, _model_args(preset="vit-base-patch16-224"))
    assert (recipe_args.base_learning_rate, recipe_args.warmup_learning_rate) == (1e-4, 5e-7)  # 800-epoch configs
    _, _, recipe_args, _, _ = parse_run_arguments(["--preset", "swin-base-window6-192"])
    resolve_recipe_defaults(recipe_args, _model_args(preset="swin-base-window6-192"))
    assert (recipe_args.base_learning_rate, recipe_args.warmup_learning_rate, recipe_args.min_learning_rate) == (
        2e-4,
        1e-6,
        1e-5,
    )


# ---------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_warms_up_from_warmup_lr_and_ends_at_min_lr():
    schedule = SimMIMLRLambda(base_lr=1.0, num_training_steps=100, num_warmup_steps=10, warmup_lr=0.1, min_lr=0.01)
    assert schedule.lr_at(0) == pytest.approx(0.1)
    assert schedule.lr_at(5) == pytest.approx(0.55)  # halfway through the warmup
    assert schedule.lr_at(50) == pytest.approx(0.01 + 0.99 * 0.5)  # cos(pi/2) = 0
    assert schedule.lr_at(100) == pytest.approx(0.01)
    after = [schedule.lr_at(t) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # timm's CosineLRScheduler(warmup_prefix=False), as the official code: the cosine spans the whole run
    assert schedule.lr_at(10) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.1)))


def test_multistep_schedule_drops_by_gamma_at_the_milestones():
    schedule = SimMIMLRLambda(1.0, 800, 10, 5e-7 * 2048, 0.0, "multistep", milestones=[700], gamma=0.1)
    assert schedule.lr_at(0) == pytest.approx(5e-7 * 2048)
    assert schedule.lr_at(10) == schedule.lr_at(699) == 1.0
    assert schedule.lr_at(700) == schedule.lr_at(799) == pytest.approx(0.1)


def test_scheduler_drives_the_optimizer_step_by_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-3)
    scheduler = get_simmim_scheduler(optimizer, 40, num_warmup_steps=4, warmup_lr=1e-5, min_lr=1e-4)
    reference = SimMIMLRLambda(2e-3, 40, 4, 1e-5, 1e-4)
    seen = []
    for _ in range(40):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([reference.lr_at(t) for t in range(40)])
    milestones = get_simmim_scheduler(torch.optim.AdamW([param], lr=1.0), 80, schedule="multistep", milestones=[0.875])
    assert milestones.lr_lambdas[0].milestones == [70]  # a fraction of the run -> a step


def _group_learning_rates(scheduler, optimizer, steps):
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_every_group_warms_up_from_and_decays_to_the_absolute_learning_rates():
    """timm's schedulers (the official code's): each group goes from the absolute warmup_lr to its own peak, then to
    the absolute min_lr; a layer-decayed group (peak 0.25) is not the peak group's curve scaled by 0.25."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.25}])
    scheduler = get_simmim_scheduler(optimizer, 10, num_warmup_steps=2, warmup_lr=0.1, min_lr=0.01)
    seen = _group_learning_rates(scheduler, optimizer, 11)
    assert seen[0] == pytest.approx([0.1, 0.1])  # the warmup starts at warmup_lr for every group
    assert seen[1] == pytest.approx([0.55, 0.175])  # halfway: 0.1 + (peak - 0.1) / 2
    assert seen[5] == pytest.approx([0.505, 0.13])  # cos(pi/2) = 0: 0.01 + (peak - 0.01) / 2
    assert seen[10] == pytest.approx([0.01, 0.01])  # the cosine ends at min_lr for every group
    state = scheduler.state_dict()  # callable objects, saved with the checkpoint (a lambda would be dropped)
    assert [saved["base_lr"] for saved in state["lr_lambdas"]] == [1.0, 0.25]

    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.25}])
    scheduler = get_simmim_scheduler(optimizer, 10, 2, 0.1, 0.0, "multistep", milestones=[6], gamma=0.1)
    seen = _group_learning_rates(scheduler, optimizer, 7)
    assert seen[1] == pytest.approx([0.55, 0.175])
    assert seen[5] == pytest.approx([1.0, 0.25]) and seen[6] == pytest.approx([0.1, 0.025])


def test_the_trainer_uses_the_recipe_schedule(tmp_path, sample):
    train, _ = sample
    args = training_args(tmp_path, learning_rate=1e-3, max_steps=8, warmup_steps=2)
    recipe = SimMIMRecipe(schedule="cosine", warmup_lr=1e-5, min_lr=1e-4)
    trainer = SimMIMTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=pretraining_dataset(train),
        data_collator=collate_fn,
        recipe=recipe,
    )
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    reference = SimMIMLRLambda(1e-3, 8, 2, 1e-5, 1e-4)
    assert logged == pytest.approx([reference.lr_at(t) for t in range(8)])


# ------------------------------------------------------------------------------------------ the transform in Trainer
def test_dataloader_workers_see_each_new_epoch(tmp_path, sample):
    """GPU runs default to DataLoader workers: the crops and masks drawn in forked workers (persistent or not) follow
    (seed, epoch, row) exactly as in the main process, so the losses of two epochs match those without workers."""
    train, _ = sample

    def losses(**loader):
        dataset = pretraining_dataset(train)
        trainer = SimMIMTrainer(
            model=tiny_model(), args=training_args(tmp_path / str(loader), max_steps=-1, num_train_epochs=2, **loader),
            train_dataset=dataset, data_collator=collate_fn,
        )
        trainer.add_callback(EpochCallback(dataset))
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    reference = losses(dataloader_num_workers=0)
    assert len(reference) == 8  # 2 epochs of 4 steps
    assert losses(dataloader_num_workers=2) == pytest.approx(reference, rel=1e-6)
    assert losses(dataloader_num_workers=2, dataloader_persistent_workers=True) == pytest.approx(reference, rel=1e-6)


def test_uint8_batches_are_normalised_on_the_device_and_train_alike(tmp_path, sample):
    """run_mim.py feeds uint8 batches (4x less to copy); the trainer normalises them with the processor's mean and
    std, so the losses match those of the float batches."""
    train, _ = sample
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))

    def losses(uint8, processing_class=processor):
        dataset = SimMIMPretrainingDataset(train, SimMIMTransform(processor, train=True, keep_columns=(), uint8=uint8))
        trainer = SimMIMTrainer(
            model=tiny_model(), args=training_args(tmp_path / str(uint8), learning_rate=1e-3), train_dataset=dataset,
            data_collator=collate_fn, processing_class=processing_class,
        )
        if uint8:
            batch = trainer._prepare_inputs(collate_fn(dataset.__getitems__([0, 1])))
            reference = collate_fn(
                SimMIMPretrainingDataset(train, SimMIMTransform(processor, train=True, keep_columns=())).__getitems__([0, 1])
            )
            assert batch["pixel_values"].dtype == torch.float32
            torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=1e-6)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    assert losses(True) == pytest.approx(losses(False), rel=1e-5)
    with pytest.raises(ValueError, match="uint8 pixel_values need the image processor"):
        losses(True, processing_class=None)


def test_the_transform_feeds_the_trainer_and_evaluation_reports_a_loss(tmp_path, sample):
    train, validation = sample
    train_dataset = pretraining_dataset(train)
    seen = []

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=4)
    trainer = SimMIMTrainer(
        model=tiny_model(),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=pretraining_dataset(validation, train=False),
        data_collator=collate_fn,
        callbacks=[Spy()],
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"pixel_values", "bool_masked_pos"}  # no label column: SimMIM's loss needs none
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["bool_masked_pos"].shape == (8, 8, 8)
    assert batch["bool_masked_pos"].sum(dim=(1, 2)).tolist() == [40] * 8  # ceil(0.6 * 16) squares of 2x2 patches
    trainer.train()
    assert seen == [0, 1, 2, 3]
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(eval_losses) == 2 and all(math.isfinite(v) for v in eval_losses)


def test_rows_are_drawn_from_seed_epoch_and_index_only(sample):
    train, _ = sample
    dataset = pretraining_dataset(train, seed=3)
    alone = dataset[5]
    in_batch = dataset.__getitems__([9, 5, 2])[1]  # another batch composition
    np.testing.assert_array_equal(alone["pixel_values"], in_batch["pixel_values"])
    np.testing.assert_array_equal(alone["bool_masked_pos"], in_batch["bool_masked_pos"])
    dataset.set_epoch(1)
    next_epoch = dataset[5]
    assert not np.array_equal(alone["bool_masked_pos"], next_epoch["bool_masked_pos"])  # a fresh mask each epoch
    other_seed = pretraining_dataset(train, seed=4)[5]
    assert not np.array_equal(alone["bool_masked_pos"], other_seed["bool_masked_pos"])
    evaluation = pretraining_dataset(train, train=False, seed=0)
    np.testing.assert_array_equal(evaluation[5]["pixel_values"], evaluation[5]["pixel_values"])


def test_epoch_callback_sets_the_epoch_of_each_epoch(tmp_path, sample):
    from transformers import TrainerState

    train, _ = sample
    dataset = pretraining_dataset(train)
    callback = EpochCallback(dataset)
    for state_epoch, expected in ((0.0, 0), (1.0, 1), (1.75, 1), (2.0, 2)):  # 1.75: resumed mid epoch 1
        callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), None)
        assert dataset.epoch == expected

    epochs = []
    original = dataset.set_epoch
    dataset.set_epoch = lambda epoch: (epochs.append(epoch), original(epoch))
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=3)  # 32 images, batch 8: 4 steps an epoch
    trainer = SimMIMTrainer(model=tiny_model(), args=args, train_dataset=dataset, data_collator=collate_fn)
    trainer.add_callback(callback)
    trainer.train()
    assert [e for i, e in enumerate(epochs) if i == 0 or epochs[i - 1] != e] == [0, 1, 2]


def cut_png(colour):
    """A PNG whose header reads (the header check passes it) but whose pixels stop short."""
    noise = np.random.RandomState(sum(colour)).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()[:400]


def test_unreadable_rows_are_stood_in_for_and_counted_once(sample):
    cells = [png(), b"garbage", png(colour=(1, 2, 3)), cut_png((4, 5, 6))]
    dataset = pretraining_dataset(image_dataset(cells))
    assert collate_fn(dataset.__getitems__([0, 1, 2, 3]))["pixel_values"].shape[0] == 4  # no row lost
    dataset.set_epoch(1)
    dataset.__getitems__([1, 3])
    assert dataset.unreadable_mask.tolist() == [False, True, False, True]  # each bad image counted once
    assert skipped_image_counts(dataset) == {"train_skipped_images": 2, "eval_skipped_images": 0}


def test_counts_hold_what_the_check_found_before_any_row_is_read():
    """A run resumed in its last epoch, or shorter than one, may never read a bad row: the check's rows count."""
    raw = image_dataset([png(), b"garbage", png(colour=(1, 2, 3)), b"more garbage"])
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    unreadable = check_image_dataset(raw, "image", 8, "validation")
    evaluation = SeededImageDataset(raw, SimMIMTransform(processor, train=False), unreadable_rows=unreadable)
    assert len(evaluation) == 2  # the rows that can be read
    assert skipped_image_counts(None, evaluation) == {"train_skipped_images": 0, "eval_skipped_images": 2}


def test_a_batch_of_one_bad_image_does_not_stop_training_or_evaluation(tmp_path):
    cells = [png(colour=(i * 30, 60, 90)) for i in range(6)]
    cells[1], cells[4] = b"garbage", cut_png((7, 8, 9))
    raw = image_dataset(cells)
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    unreadable = check_image_dataset(raw, "image", 8)
    train_dataset = SeededImageDataset(raw, SimMIMTransform(processor, keep_columns=()), unreadable_rows=unreadable)
    # evaluation without the check: both bad images are found when read, in batches of one
    eval_dataset = SeededImageDataset(raw, SimMIMTransform(processor, train=False, keep_columns=()), split="validation")
    args = training_args(
        tmp_path, per_device_train_batch_size=1, per_device_eval_batch_size=1, max_steps=10, eval_strategy="steps",
        eval_steps=10,
    )
    trainer = SimMIMTrainer(
        model=tiny_model(), args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, data_collator=collate_fn
    )
    trainer.train()  # 2 epochs of the 5 rows the check leaves, one image a step
    assert trainer.state.global_step == 10 and math.isfinite(trainer.evaluate()["eval_loss"])
    assert skipped_image_counts(train_dataset, eval_dataset, trainer) == {
        "train_skipped_images": 2, "eval_skipped_images": 2
    }


# ---------------------------------------------------------------------------------------------- callbacks
def test_throughput_and_learning_rate_reach_the_logs(tmp_path, sample):
    train, _ = sample
    printed = []

    class Printer(TrainerCallback):  # stands for the progress bar / TensorBoard, which come before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            printed.append(dict(logs))

    args = training_args(tmp_path, max_steps=4, logging_steps=2)
    trainer = SimMIMTrainer(
        model=tiny_model(), args=args, train_dataset=pretraining_dataset(train), data_collator=collate_fn
    )
    trainer.add_callback(Printer())
    trainer.callback_handler.callbacks.insert(0, trainer.callback_handler.callbacks.pop())  # printer first
    add_callback_first(trainer, ThroughputCallback())
    trainer.train()
    training_logs = [e for e in printed if "loss" in e]
    assert len(training_logs) == 2
    assert all(e["images_per_second"] > 0 and e["learning_rate"] > 0 for e in training_logs)
    assert all("images_per_second" in e for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------------------------------------- arguments
def test_simmim_defaults_and_the_flags_forced_inside():
    _, _, _, args, given = parse_run_arguments(["--weight_decay", "0.1", "--remove_unused_columns", "True"])
    assert args.weight_decay == 0.1  # a given flag wins
    assert args.max_grad_norm == 5.0 and args.warmup_steps == 0.1  # SimMIM defaults
    assert args.adam_beta1 == 0.9 and args.adam_beta2 == 0.999
    assert args.remove_unused_columns is False  # forced: the image column must reach the transform
    assert args.label_names == ["bool_masked_pos"]  # forced: evaluation reports a loss
    assert given >= {"weight_decay", "remove_unused_columns"}


def test_arguments_from_a_json_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"preset": "swin-tiny-test", "weight_decay": 0.1, "max_steps": 7}')
    model_args, _, _, args, given = parse_run_arguments([str(path)])
    assert model_args.preset == "swin-tiny-test" and args.max_steps == 7
    assert args.weight_decay == 0.1 and args.max_grad_norm == 5.0  # given value, then SimMIM default
    assert given == {"preset", "weight_decay", "max_steps"}


def test_use_cpu_is_set_where_there_is_no_accelerator(monkeypatch):
    import hf_simmim.training.arguments as arguments

    monkeypatch.setattr(arguments, "accelerator_available", lambda: False)
    assert simmim_training_defaults()["use_cpu"] is True
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    assert simmim_training_defaults()["use_cpu"] is False
    assert simmim_training_defaults()["accelerator_config"] == {"non_blocking": True}  # async copies to the GPU
    args = parse_run_arguments([])[3]
    assert args.accelerator_config.non_blocking and args.dataloader_pin_memory


def test_dataloader_workers_default_to_the_cpus_of_each_local_process(monkeypatch):
    import hf_simmim.training.arguments as arguments

    monkeypatch.setattr(arguments.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(arguments, "accelerator_available", lambda: False)
    assert simmim_training_defaults()["dataloader_num_workers"] == 0  # laptop: decode in the main process
    assert simmim_training_defaults()["dataloader_persistent_workers"] is False
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert simmim_training_defaults()["dataloader_num_workers"] == 15  # one GPU, 16 CPUs: all but one
    fork = multiprocessing.get_context().get_start_method() == "fork"
    assert simmim_training_defaults()["dataloader_persistent_workers"] is fork  # safe only with forked workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert simmim_training_defaults()["dataloader_num_workers"] == 3  # 16 CPUs / 4 processes, less one each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert simmim_training_defaults()["dataloader_num_workers"] == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(arguments.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert simmim_training_defaults()["dataloader_num_workers"] == 16  # capped
    args = parse_run_arguments(["--dataloader_num_workers", "2"])[3]
    assert args.dataloader_num_workers == 2  # the command line wins


def test_model_from_preset_config_file_or_checkpoint(tmp_path):
    model, processor = load_pretraining_model(_model_args(preset="swin-tiny-test", config_overrides="mask_ratio=0.5"))
    assert model.config.backbone == "swin" and model.config.mask_ratio == 0.5 and processor.mask_ratio == 0.5
    model.config.to_json_file(str(tmp_path / "config.json"))
    from_file, _ = load_pretraining_model(_model_args(config_file=str(tmp_path / "config.json")))
    assert from_file.config.embed_dim == model.config.embed_dim
    model.save_pretrained(str(tmp_path / "ckpt"))
    continued, processor = load_pretraining_model(_model_args(model_name_or_path=str(tmp_path / "ckpt")))
    torch.testing.assert_close(continued.decoder[0].weight, model.decoder[0].weight)
    assert processor.image_size == 32  # rebuilt from the config when the checkpoint has none
    with pytest.raises(ValueError, match="only one of"):
        load_pretraining_model(_model_args(preset="vit-tiny-test", config_file=str(tmp_path / "config.json")))


def test_resume_last_needs_a_checkpoint(tmp_path):
    model_args, _, recipe_args, args, given = parse_run_arguments(
        ["--output_dir", str(tmp_path / "none"), "--resume_from_checkpoint", "last"]
    )
    with pytest.raises(ValueError, match="no checkpoint-"):
        prepare_output_dir(args, recipe_args, model_args, given)
    (tmp_path / "run" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-12").mkdir()
    model_args, _, recipe_args, args, given = parse_run_arguments(
        ["--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", "last"]
    )
    assert prepare_output_dir(args, recipe_args, model_args, given).endswith("checkpoint-12")


# ---------------------------------------------------------------------------------------------- loading and checks
def test_loading_the_bundled_sample_needs_no_argument():
    train, validation = load_image_datasets()
    assert (len(train), len(validation)) == (640, 200)
    assert detect_image_column(train) == "image"


def test_local_parquet_image_folder_and_a_seeded_split(tmp_path):
    image_dataset([png(colour=(i, i, i)) for i in range(20)]).to_parquet(str(tmp_path / "data.parquet"))
    train, validation = load_image_datasets(train_dir=str(tmp_path / "data.parquet"), validation_split_percentage=10)
    assert (len(train), len(validation)) == (18, 2)
    again, _ = load_image_datasets(train_dir=str(tmp_path / "*.parquet"), validation_split_percentage=10)
    assert again["image"] == train["image"]  # the same split in every process
    folder = tmp_path / "folder"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / label / f"{i}.png")
    train, validation = load_image_datasets(train_dir=str(folder), validation_split_percentage=0)
    assert len(train) == 6 and validation is None and detect_image_column(train) == "image"
    image_dataset([png()] * 5).save_to_disk(str(tmp_path / "saved"))  # Arrow files of `save_to_disk`
    train, validation = load_image_datasets(train_dir=str(tmp_path / "saved"), validation_split_percentage=0)
    assert len(train) == 5 and isinstance(train.features["image"], datasets.Image)
    with pytest.raises(FileNotFoundError, match="neither a folder of images nor Parquet"):
        load_image_datasets(train_dir=str(tmp_path / "missing"))


def test_image_column_detection_and_refusals():
    dataset = datasets.Dataset.from_dict({"caption": ["a"], "img": [png()]})
    assert detect_image_column(dataset) == "img"
    with pytest.raises(ValueError, match=r"'photo' is not in the dataset; its columns are \['caption', 'img'\]"):
        detect_image_column(dataset, "photo")
    with pytest.raises(ValueError, match="No image column found"):
        detect_image_column(datasets.Dataset.from_dict({"caption": ["a"]}))
    with pytest.raises(ValueError, match="validation split is empty"):
        check_image_dataset(image_dataset([]), "image", 8, "validation")
    with pytest.raises(ValueError, match="None of the 2 checked images"):
        check_image_dataset(image_dataset([b"x", b"y"]), "image", 8)
    assert check_image_dataset(image_dataset([png(), b"x"]), "image", 8) == [1]
