"""`SimMIMTrainer` and `SimMIMFineTuneTrainer`: `transformers.Trainer` with the SimMIM recipe (weight decay groups,
the official schedule, a stop on a non-finite loss checked without a per-step sync, uint8 batches normalised on the
device, the SimMIM model card) and, for fine-tuning, layer-wise learning-rate decay and mixup / cutmix."""

import logging
import os
import re

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.image_ops import normalize_pixel_batch
from ..models.modeling_conv_masking import convert_to_sync_batchnorm
from .optim import layer_decay_parameter_groups, no_weight_decay_parameter_names
from .schedules import SimMIMRecipe, get_simmim_scheduler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite at optimizer step `step` (`epoch`, `loss`, on process `process`).

    The loss is checked on the device and read only where `Trainer` synchronises anyway (logging, evaluation and
    checkpoint steps, and the end of training), so the error is raised at `found_at`, the first such step after
    `step`: steps `step` to `found_at` were applied to the weights in memory, but no checkpoint holds them.
    `checkpoint` is the last one saved before `step` in the output directory, or `None`.
    """

    def __init__(self, step, epoch, loss, found_at, process=0, checkpoint=None):
        self.step, self.epoch, self.loss = step, epoch, loss
        self.found_at, self.process, self.checkpoint = found_at, process, checkpoint
        where = f" on process {process}" if process else ""
        applied = f"step {step} was" if found_at == step else f"steps {step} to {found_at} were"
        resume = (
            f"resume from {checkpoint}, the last checkpoint, saved before step {step}, with --resume_from_checkpoint"
            if checkpoint is not None
            else "no checkpoint was saved before it: start again"
        )
        super().__init__(
            f"The training loss was {loss} at optimizer step {step} (epoch {epoch:.2f}){where}; found at step "
            f"{found_at} (the loss is read from the device only at logging, evaluation and checkpoint steps and at "
            f"the end, so that training never waits for it). Training stopped there: {applied} applied to the "
            "weights in memory, which must not be used, and no checkpoint was saved from them. Try a lower "
            f"learning rate, fp32 instead of bf16/fp16, or check the data; {resume}."
        )


class NonFiniteLossRecord:
    """The first optimizer step whose training loss was NaN/inf, kept on the device: `record` runs at every
    micro-step with tensor operations only (no device-to-host copy, no collective), `read` once in a while."""

    def __init__(self):
        self.step = None  # 0-dim int64 on the loss's device; 0 while every loss was finite
        self.epoch = self.loss = None
        self.last_recorded = self.last_read = 0  # optimizer steps, on the host

    def record(self, loss, step, epoch):
        loss = loss.detach().float()
        if self.step is None:
            self.step = torch.zeros((), dtype=torch.int64, device=loss.device)
            self.epoch = torch.zeros((), dtype=torch.float32, device=loss.device)
            self.loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = (self.step == 0) & ~torch.isfinite(loss)
        self.step = torch.where(first, step, self.step)
        self.epoch = torch.where(first, epoch, self.epoch)
        self.loss = torch.where(first, loss, self.loss)
        self.last_recorded = step

    def read(self, gather):
        """(step, epoch, loss, process) of the first non-finite loss of any process, the same on every process,
        or `None`; `gather` is `Accelerator.gather`. Every process must call it at the same step: one sync and one
        collective, a second one only when a process found a non-finite loss."""
        self.last_read = self.last_recorded
        if self.step is None:
            return None
        steps = gather(self.step.reshape(1)).cpu()
        if not steps.any():
            return None
        values = gather(torch.stack([self.epoch, self.loss]).reshape(1, 2)).cpu()
        return earliest_nonfinite_loss(steps.tolist(), values.tolist())


def earliest_nonfinite_loss(steps, values):
    """Agreement over processes: `steps[i]` is process i's first step with a non-finite loss (0: none) and
    `values[i]` its (epoch, loss). Returns (step, epoch, loss, process) of the earliest, lowest process first on a
    tie, or `None`."""
    found = [(step, process) for process, step in enumerate(steps) if step > 0]
    if not found:
        return None
    step, process = min(found)
    epoch, loss = values[process]
    return step, epoch, loss, process


class SimMIMTrainer(Trainer):
    """`Trainer` with the SimMIM recipe.

    Differences from `Trainer`, each needed where the model and optimizer are built inside `train()` (after
    DDP/FSDP/DeepSpeed wrapping), so they cannot be passed in from outside:
    - weight decay groups from `no_weight_decay_parameter_names` (`get_decay_parameter_names`): the official
      exemptions, plus the recipe's opt-in `no_weight_decay_names`;
    - the official warmup + cosine/multistep schedule (`create_scheduler`), per `recipe`;
    - a NaN/inf loss stops training, naming the first step that had one: checked on the device at each step
      (`training_step`, no sync) and read where `Trainer` synchronises anyway, before it logs, evaluates or saves
      a checkpoint and at the end (`_maybe_log_save_evaluate`, `train`), so no checkpoint holds a step taken
      after it; all processes agree, so a distributed run stops everywhere instead of hanging;
    - `create_model_card` writes the SimMIM model card (`model_card_writer(trainer)`), also used by
      `push_to_hub`;
    - the loss is a per-batch mean, so it is averaged over gradient accumulation steps (never rescaled by a
      token count, which `Trainer` would do for a `forward(**kwargs)` model);
    - uint8 `pixel_values` (`SimMIMTransform(uint8=True)`) are normalised on the device with the image
      processor's mean and std (`_prepare_inputs`), after the 4x smaller copy; with `device_transform`
      (`data.DeviceAugmentation`), training batches of uncropped uint8 images are first cropped, resized and
      flipped there;
    - in a multi-process run the batch norms of a CNN (encoder and hierarchical decoder) compute their training
      statistics over all processes, as SparK's SyncBatchNorm, keeping their visible-only statistics (torch's
      `convert_sync_batchnorm` would replace them by modules that cannot skip masked positions).
    """

    def __init__(self, *args, recipe=None, model_card_writer=None, device_transform=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe if recipe is not None else SimMIMRecipe()
        self.model_card_writer = model_card_writer
        self.device_transform = device_transform
        self.model_accepts_loss_kwargs = False
        self.nonfinite_losses = None  # a `NonFiniteLossRecord` during `train()` when the recipe stops on one
        if self.args.world_size > 1:
            synchronised = convert_to_sync_batchnorm(self.model)
            if synchronised:
                logger.info(
                    "Synchronising %d batch norms across the %d processes (statistics over the visible positions).",
                    synchronised, self.args.world_size,
                )

    def _prepare_inputs(self, inputs):
        inputs = super()._prepare_inputs(inputs)
        if self.device_transform is not None:  # after the copy: the workers sent whole images, cropped here
            inputs = self.device_transform(inputs)
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
        skip = no_weight_decay_parameter_names(model, extra_names=self.recipe.no_weight_decay_names)
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
            warmup_prefix=self.recipe.warmup_prefix,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def train(self, *args, **kwargs):
        self.nonfinite_losses = NonFiniteLossRecord() if self.recipe.stop_on_nonfinite_loss else None
        output = super().train(*args, **kwargs)
        self._stop_on_nonfinite_loss()  # a run whose last step neither logged nor saved
        return output

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.nonfinite_losses is not None:
            self.nonfinite_losses.record(loss, self.state.global_step + 1, self.state.epoch or 0.0)
        return loss

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        # Trainer reads the loss here to log it (a sync), evaluates and saves checkpoints: reading the record at the
        # same points costs no extra wait and keeps every checkpoint from holding a step after a non-finite loss.
        control = self.control
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self._stop_on_nonfinite_loss()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def _stop_on_nonfinite_loss(self):
        record = self.nonfinite_losses
        if record is None or record.last_read == record.last_recorded:
            return
        found = record.read(self.accelerator.gather)
        if found is not None:
            step, epoch, loss, process = found
            raise NonFiniteLossError(
                step, epoch, loss, self.state.global_step, process, last_checkpoint_before(self.args.output_dir, step)
            )

    def create_model_card(self, *args, **kwargs):
        if self.model_card_writer is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.model_card_writer(self)


class SimMIMFineTuneTrainer(SimMIMTrainer):
    """`SimMIMTrainer` for classification: AdamW over `layer_decay_parameter_groups` (each layer's learning rate
    peaks at `lr * lr_scale`, between the recipe's absolute `warmup_lr` and `min_lr`), and mixup / cutmix on
    training batches only."""

    def __init__(self, *args, layer_decay=1.0, mixup=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_decay = layer_decay
        self.mixup = mixup

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = layer_decay_parameter_groups(
                model, self.args.learning_rate, self.args.weight_decay, self.layer_decay,
                extra_no_decay_names=self.recipe.no_weight_decay_names,
            )
            for group in groups:
                group.pop("names")
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # each group has its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        if self.mixup is not None:
            inputs = self.mixup(inputs)
        return super().training_step(model, inputs, *args, **kwargs)


def last_checkpoint_before(output_dir, step):
    """The latest `checkpoint-N` folder of `output_dir` with N < `step`, or `None`."""
    if not os.path.isdir(output_dir):
        return None
    earlier = [
        (int(name.rsplit("-", 1)[1]), name)
        for name in os.listdir(output_dir)
        if re.fullmatch(f"{PREFIX_CHECKPOINT_DIR}-[0-9]+", name) and os.path.isdir(os.path.join(output_dir, name))
    ]
    earlier = [(number, name) for number, name in earlier if number < step]
    return os.path.join(output_dir, max(earlier)[1]) if earlier else None


def count_unreadable_images(trainer, dataset):
    """Distinct unreadable rows of a `SeededImageDataset` (found by the header check or by a read so far) over
    every process of the run."""
    flags = torch.from_numpy(dataset.unreadable_mask.astype("float32")).to(trainer.args.device)
    return int((trainer.accelerator.reduce(flags, reduction="sum") > 0).sum().item())
