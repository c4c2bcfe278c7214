"""The SimMIM pretraining recipe on top of `transformers.Trainer`.

- which parameters get weight decay (`no_weight_decay_parameter_names`, `parameter_groups`),
- the linear learning-rate scaling `lr = base_lr * total_batch / 512` (`scale_learning_rate`),
- the official per-step schedules: linear warmup from `warmup_lr`, then cosine to `min_lr` or step decay
  (`SimMIMLRLambda`, `get_simmim_scheduler`),
- `SimMIMTrainer`, a `Trainer` that uses all of the above, stops on a non-finite loss, and writes the SimMIM model
  card (also when `push_to_hub` uploads the output folder),
- callbacks: images/s in the logs (`ThroughputCallback`), the epoch that seeds crops and masks
  (`EpochCallback`), and reconstruction pictures at each evaluation and at the end (`ReconstructionCallback`).
"""

import math
import os
import time
from bisect import bisect_right
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainerCallback

from .data import normalize_pixel_batch

# Parameters that the official code exempts from weight decay by name (besides 1-D parameters and biases):
# `no_weight_decay()` / `no_weight_decay_keywords()` of its ViT and Swin, plus the transformers spellings.
NO_DECAY_KEYWORDS = (
    "pos_embed",  # ViT absolute position embedding (also matches Swin's absolute_pos_embed)
    "position_embedding",
    "cls_token",
    "mask_token",
    "relative_position_bias_table",
)
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

# `lr = base_lr * total_batch_size / LR_REFERENCE_BATCH_SIZE` (the paper's linear scaling rule).
LR_REFERENCE_BATCH_SIZE = 512
SCHEDULES = ("cosine", "multistep", "trainer")


# ---------------------------------------------------------------------------------------------- weight decay
def no_weight_decay_parameter_names(model):
    """Names of the trainable parameters the SimMIM recipe does not decay: normalisation layers, biases, other
    1-D parameters (e.g. layer scale), position embeddings, CLS and mask tokens, relative position bias tables."""
    norm_parameters = set()
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_MODULES):
            for name, _ in module.named_parameters(recurse=False):
                norm_parameters.add(f"{module_name}.{name}" if module_name else name)
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (
            name in norm_parameters
            or param.ndim <= 1
            or name.endswith("bias")
            or any(keyword in name for keyword in NO_DECAY_KEYWORDS)
        ):
            names.add(name)
    return names


def parameter_groups(model, weight_decay=0.05):
    """The two AdamW parameter groups of the recipe: decayed weights and everything else (weight decay 0)."""
    skip = no_weight_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------- learning rate
def scale_learning_rate(base_lr, total_batch_size, reference_batch_size=LR_REFERENCE_BATCH_SIZE):
    """`base_lr * total_batch_size / 512`: the learning rate for a total (all processes, all accumulation steps)
    batch size."""
    if total_batch_size <= 0:
        raise ValueError(f"total_batch_size={total_batch_size} must be positive.")
    return base_lr * total_batch_size / reference_batch_size


@dataclass
class SimMIMLRLambda:
    """The official per-step schedule as a `LambdaLR` multiplier of `base_lr` (so it works with `Trainer`).

    Step `t` (0-based optimizer step) gets:
    - warmup, `t < num_warmup_steps`: `warmup_lr + (base_lr - warmup_lr) * t / num_warmup_steps`;
    - `"cosine"`: `min_lr + (base_lr - min_lr) * (1 + cos(pi * t / num_training_steps)) / 2`, the cosine running
      over the whole run as in timm's `CosineLRScheduler(warmup_prefix=False)` used by the official code;
    - `"multistep"`: `base_lr * gamma ** (number of milestones <= t)`, milestones in steps (the 800-epoch configs
      decay x0.1 at epoch 700 of 800).
    A callable object (not a lambda), so `LambdaLR.state_dict()` saves it with the checkpoint.
    """

    base_lr: float
    num_training_steps: int
    num_warmup_steps: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    schedule: str = "cosine"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1

    def __post_init__(self):
        if self.schedule not in ("cosine", "multistep"):
            raise ValueError(f"schedule={self.schedule!r} must be 'cosine' or 'multistep'.")
        if self.num_training_steps <= 0:
            raise ValueError(f"num_training_steps={self.num_training_steps} must be positive.")
        self.milestones = sorted(int(m) for m in self.milestones)

    def lr_at(self, step):
        if step < self.num_warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.num_warmup_steps
        if self.schedule == "multistep":
            return self.base_lr * self.gamma ** bisect_right(self.milestones, step)
        progress = min(step, self.num_training_steps) / self.num_training_steps
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step):
        return self.lr_at(step) / self.base_lr if self.base_lr else 0.0


def get_simmim_scheduler(
    optimizer,
    num_training_steps,
    num_warmup_steps=0,
    warmup_lr=0.0,
    min_lr=0.0,
    schedule="cosine",
    milestones=(),
    gamma=0.1,
    base_lr=None,
):
    """A `LambdaLR` following `SimMIMLRLambda`.

    `base_lr` is the peak learning rate (default: the largest learning rate of the optimizer's groups); `warmup_lr`
    and `min_lr` are absolute learning rates at that peak. A group set to a fraction of the peak (e.g. layer-wise
    decay) follows the same curve scaled by that fraction. `milestones` are fractions of `num_training_steps` in
    (0, 1] (e.g. 0.875 for epoch 700 of 800) or absolute step numbers (> 1).
    """
    if base_lr is None:
        base_lr = max(group.get("initial_lr", group["lr"]) for group in optimizer.param_groups)
    steps = [round(m * num_training_steps) if m <= 1 else int(m) for m in milestones]
    lr_lambda = SimMIMLRLambda(
        base_lr, num_training_steps, num_warmup_steps, warmup_lr, min_lr, schedule, steps, gamma
    )
    return LambdaLR(optimizer, lr_lambda)


@dataclass
class SimMIMRecipe:
    """What `SimMIMTrainer` adds to `TrainingArguments` (which holds lr, weight decay, betas, clipping, warmup).

    Args:
        schedule: `"cosine"` (warmup from `warmup_lr`, cosine to `min_lr`), `"multistep"` (warmup, then x`gamma`
            at each of `milestones`), or `"trainer"` (`TrainingArguments.lr_scheduler_type`).
        warmup_lr, min_lr: absolute learning rates (already scaled like the peak learning rate).
        milestones: for `"multistep"`: fractions of the run in (0, 1] or absolute steps.
        stop_on_nonfinite_loss: raise `NonFiniteLossError` on a NaN/inf loss, before the optimizer step.
    """

    schedule: str = "cosine"
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: tuple = (0.875,)
    gamma: float = 0.1
    stop_on_nonfinite_loss: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported: use one of {SCHEDULES}.")


# ---------------------------------------------------------------------------------------------- trainer
class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised before the optimizer applies that step."""

    def __init__(self, step, epoch, loss):
        self.step, self.epoch, self.loss = step, epoch, loss
        super().__init__(
            f"The training loss is {loss} at optimizer step {step} (epoch {epoch:.2f}); stopped before applying "
            "that step, so no weight was updated with it. Try a lower learning rate, "
            "fp32 instead of bf16/fp16, or check the data; resume from the last good checkpoint with "
            "--resume_from_checkpoint."
        )


class SimMIMTrainer(Trainer):
    """`Trainer` with the SimMIM recipe.

    Differences from `Trainer`, each needed where the model and optimizer are built inside `train()` (after
    DDP/FSDP/DeepSpeed wrapping), so they cannot be passed in from outside:
    - weight decay groups from `no_weight_decay_parameter_names` (`get_decay_parameter_names`);
    - the official warmup + cosine/multistep schedule (`create_scheduler`), per `recipe`;
    - a NaN/inf loss stops training with the step number, before the optimizer step (`training_step`); all
      processes agree, so a distributed run stops everywhere instead of hanging;
    - `create_model_card` writes the SimMIM model card (`model_card_writer(trainer)`), also used by
      `push_to_hub`;
    - the loss is a per-batch mean, so it is averaged over gradient accumulation steps (never rescaled by a
      token count, which `Trainer` would do for a `forward(**kwargs)` model);
    - uint8 `pixel_values` (`SimMIMTransform(uint8=True)`) are normalised on the device with the image
      processor's mean and std (`_prepare_inputs`), after the 4x smaller copy.
    """

    def __init__(self, *args, recipe=None, model_card_writer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe if recipe is not None else SimMIMRecipe()
        self.model_card_writer = model_card_writer
        self.model_accepts_loss_kwargs = False

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.dtype == torch.uint8:
            processor = self.processing_class
            if processor is None or not hasattr(processor, "image_mean"):
                raise ValueError(
                    "uint8 pixel_values need the image processor's mean and std: pass processing_class=processor "
                    "to the trainer, or use SimMIMTransform(uint8=False)."
                )
            normalized = normalize_pixel_batch(pixel_values, processor.image_mean, processor.image_std)
            inputs["pixel_values"] = self._prepare_input(normalized)  # the dtype DeepSpeed wants for float inputs
        return inputs

    def get_decay_parameter_names(self, model):
        skip = no_weight_decay_parameter_names(model)
        return [name for name, param in model.named_parameters() if name not in skip]

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.recipe.schedule == "trainer" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        self.lr_scheduler = get_simmim_scheduler(
            optimizer,
            num_training_steps,
            num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
            warmup_lr=self.recipe.warmup_lr,
            min_lr=self.recipe.min_lr,
            schedule=self.recipe.schedule,
            milestones=self.recipe.milestones,
            gamma=self.recipe.gamma,
            base_lr=self.args.learning_rate,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.recipe.stop_on_nonfinite_loss:
            bad = (~torch.isfinite(loss)).float().reshape(1)
            if self.args.world_size > 1:
                bad = self.accelerator.reduce(bad, reduction="sum")
            if bad.item() > 0:
                step = self.state.global_step + 1
                epoch = self.state.epoch or 0.0
                value = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
                raise NonFiniteLossError(step, epoch, value)
        return loss

    def create_model_card(self, *args, **kwargs):
        if self.model_card_writer is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.model_card_writer(self)


def total_train_batch_size(args):
    """Images per optimizer step over all processes and accumulation steps."""
    return args.per_device_train_batch_size * max(args.world_size, 1) * args.gradient_accumulation_steps


def count_unreadable_images(trainer, dataset):
    """Distinct unreadable rows of a `SimMIMPretrainingDataset` read so far by any process of the run."""
    flags = torch.from_numpy(dataset.unreadable_mask.astype("float32")).to(trainer.args.device)
    return int((trainer.accelerator.reduce(flags, reduction="sum") > 0).sum().item())


def add_callback_first(trainer, callback):
    """Add `callback` before the printing and reporting callbacks, so what it adds to the logs is shown."""
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def tensorboard_writer(trainer):
    """The `SummaryWriter` of the Trainer's TensorBoard callback, or `None` (not installed / not reported to)."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            return getattr(callback, "tb_writer", None)
    return None


# ---------------------------------------------------------------------------------------------- callbacks
class ThroughputCallback(TrainerCallback):
    """Adds `images_per_second` (training images over all processes per second of wall time since the previous
    log, evaluation time excluded) to each training log. Add it with `add_callback_first` so it is printed."""

    def __init__(self):
        self._time = None
        self._step = 0
        self._eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._time, self._step, self._eval_seconds = time.perf_counter(), state.global_step, 0.0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._time is None:
            return
        now = time.perf_counter()
        seconds = now - self._time - self._eval_seconds
        steps = state.global_step - self._step
        if steps > 0 and seconds > 0:
            value = round(steps * total_train_batch_size(args) / seconds, 1)
            logs["images_per_second"] = value
            # `Trainer.log` stored a copy of the logs before calling the callbacks: keep the history complete.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["images_per_second"] = value
        self._time, self._step, self._eval_seconds = now, state.global_step, 0.0


class EpochCallback(TrainerCallback):
    """Tells datasets with `set_epoch` (e.g. `SimMIMPretrainingDataset`) which epoch starts, so crops and masks
    are drawn from (seed, epoch, row) and a resumed run sees exactly the data of an uninterrupted one."""

    def __init__(self, *datasets):
        self.datasets = [d for d in datasets if hasattr(d, "set_epoch")]

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


class ReconstructionCallback(TrainerCallback):
    """Draws the reconstruction grid of a fixed batch of images at each evaluation and at the end of training:
    `OUTPUT/reconstruction.png` (latest), `OUTPUT/reconstructions/step-NNNNNN.png`, and TensorBoard (tag
    `reconstruction`) when the Trainer reports to it.

    The forward pass runs on every process (sharded models need them all); only the main process writes.
    """

    def __init__(self, pixel_values, bool_masked_pos, image_mean, image_std, output_dir=None, writer=None):
        if pixel_values.shape[0] == 0:
            raise ValueError("ReconstructionCallback needs at least one image.")
        self.pixel_values = pixel_values
        self.bool_masked_pos = bool_masked_pos
        self.image_mean = image_mean
        self.image_std = image_std
        self.output_dir = output_dir
        self.writer = writer  # a SummaryWriter, or a callable returning one (or None)
        self.last_path = None

    @classmethod
    def from_dataset(cls, dataset, num_images, image_processor, **kwargs):
        """The first `num_images` rows of a `SimMIMPretrainingDataset` (built with an eval transform: centre crop,
        masks fixed by its seed) as the fixed batch to draw."""
        batch = dataset.batch(range(min(num_images, len(dataset))))
        return cls(
            batch["pixel_values"],
            batch["bool_masked_pos"],
            image_processor.image_mean,
            image_processor.image_std,
            **kwargs,
        )

    def _draw(self, args, state, model):
        from .visualize import reconstruct, reconstruction_grid

        if model is None:
            return None
        reconstruction = reconstruct(model, self.pixel_values, self.bool_masked_pos)
        if not state.is_world_process_zero:
            return None
        unwrapped = getattr(model, "module", model)
        grid = reconstruction_grid(
            self.pixel_values,
            self.bool_masked_pos,
            reconstruction,
            patch_size=unwrapped.config.patch_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            title=f"step {state.global_step}",
        )
        output_dir = self.output_dir or args.output_dir
        os.makedirs(os.path.join(output_dir, "reconstructions"), exist_ok=True)
        grid.save(os.path.join(output_dir, "reconstructions", f"step-{state.global_step:06d}.png"))
        self.last_path = os.path.join(output_dir, "reconstruction.png")
        grid.save(self.last_path)
        writer = self.writer() if callable(self.writer) else self.writer
        if writer is not None:
            import numpy as np

            writer.add_image("reconstruction", np.asarray(grid), state.global_step, dataformats="HWC")
            writer.flush()
        return self.last_path

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._draw(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._draw(args, state, model)
