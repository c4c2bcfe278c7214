"""`SimMIMTrainer` and `SimMIMFineTuneTrainer`: `transformers.Trainer` with the SimMIM recipe (weight decay groups,
the official schedule, a stop on a non-finite loss, uint8 batches normalised on the device, the SimMIM model card)
and, for fine-tuning, layer-wise learning-rate decay and mixup / cutmix."""

import logging

import torch
from transformers import Trainer

from ..data.image_ops import normalize_pixel_batch
from ..models.modeling_conv_masking import convert_to_sync_batchnorm
from .optim import layer_decay_parameter_groups, no_weight_decay_parameter_names
from .schedules import SimMIMRecipe, get_simmim_scheduler

logger = logging.getLogger(__name__)


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
    - weight decay groups from `no_weight_decay_parameter_names` (`get_decay_parameter_names`): the official
      exemptions, plus the recipe's opt-in `no_weight_decay_names`;
    - the official warmup + cosine/multistep schedule (`create_scheduler`), per `recipe`;
    - a NaN/inf loss stops training with the step number, before the optimizer step (`training_step`); all
      processes agree, so a distributed run stops everywhere instead of hanging;
    - `create_model_card` writes the SimMIM model card (`model_card_writer(trainer)`), also used by
      `push_to_hub`;
    - the loss is a per-batch mean, so it is averaged over gradient accumulation steps (never rescaled by a
      token count, which `Trainer` would do for a `forward(**kwargs)` model);
    - uint8 `pixel_values` (`SimMIMTransform(uint8=True)`) are normalised on the device with the image
      processor's mean and std (`_prepare_inputs`), after the 4x smaller copy;
    - in a multi-process run the batch norms of a CNN (encoder and hierarchical decoder) compute their training
      statistics over all processes, as SparK's SyncBatchNorm, keeping their visible-only statistics (torch's
      `convert_sync_batchnorm` would replace them by modules that cannot skip masked positions).
    """

    def __init__(self, *args, recipe=None, model_card_writer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe if recipe is not None else SimMIMRecipe()
        self.model_card_writer = model_card_writer
        self.model_accepts_loss_kwargs = False
        if self.args.world_size > 1:
            synchronised = convert_to_sync_batchnorm(self.model)
            if synchronised:
                logger.info(
                    "Synchronising %d batch norms across the %d processes (statistics over the visible positions).",
                    synchronised, self.args.world_size,
                )

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


def count_unreadable_images(trainer, dataset):
    """Distinct unreadable rows of a `SeededImageDataset` (found by the header check or by a read so far) over
    every process of the run."""
    flags = torch.from_numpy(dataset.unreadable_mask.astype("float32")).to(trainer.args.device)
    return int((trainer.accelerator.reduce(flags, reduction="sum") > 0).sum().item())
