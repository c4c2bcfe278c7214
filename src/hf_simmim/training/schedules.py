"""The official per-step learning-rate schedules: linear warmup from `warmup_lr`, then cosine to `min_lr` or step
decay, as a `LambdaLR` the `Trainer` can save and resume. As timm's schedulers (used by the official code), each
parameter group runs from the absolute `warmup_lr` to its own peak learning rate, then to the absolute `min_lr`."""

import math
from bisect import bisect_right
from dataclasses import dataclass, field

from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "multistep", "trainer")


@dataclass
class SimMIMLRLambda:
    """The official per-step schedule of one parameter group peaking at `base_lr`, as a `LambdaLR` multiplier of
    `base_lr` (so it works with `Trainer`).

    Step `t` (0-based optimizer step) gets:
    - warmup, `t < num_warmup_steps`: `warmup_lr + (base_lr - warmup_lr) * t / num_warmup_steps`;
    - `"cosine"`: `min_lr + (base_lr - min_lr) * (1 + cos(pi * t / num_training_steps)) / 2`, the cosine running
      over the whole run as in timm's `CosineLRScheduler(warmup_prefix=False)` used by microsoft/SimMIM; with
      `warmup_prefix`, over the steps after warmup, `(t - num_warmup_steps) / (num_training_steps -
      num_warmup_steps)`, as microsoft/Swin-Transformer's SwinV2 fine-tuning (timm's `warmup_prefix=True`);
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
    warmup_prefix: bool = False

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
        step, steps = min(step, self.num_training_steps), self.num_training_steps
        if self.warmup_prefix:
            step, steps = step - self.num_warmup_steps, max(steps - self.num_warmup_steps, 1)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    def __call__(self, step):
        return self.lr_at(step) / self.base_lr if self.base_lr else 0.0


def get_simmim_scheduler(
    optimizer, num_training_steps, num_warmup_steps=0, warmup_lr=0.0, min_lr=0.0, schedule="cosine", milestones=(),
    gamma=0.1, warmup_prefix=False,
):
    """A `LambdaLR` with one `SimMIMLRLambda` per parameter group, peaking at the group's own learning rate.

    `warmup_lr` and `min_lr` are absolute, the same for every group, as in timm's `CosineLRScheduler` /
    `MultiStepLRScheduler` that the official code uses: a layer-wise decayed group warms up from `warmup_lr` to its
    decayed peak and ends at `min_lr`, not at `min_lr` times its scale. `milestones` are fractions of
    `num_training_steps` in (0, 1] (e.g. 0.875 for epoch 700 of 800) or absolute step numbers (> 1).
    `warmup_prefix`: the cosine runs over the steps after warmup (see `SimMIMLRLambda`).
    """
    steps = [round(m * num_training_steps) if m <= 1 else int(m) for m in milestones]
    lr_lambdas = [
        SimMIMLRLambda(
            group.get("initial_lr", group["lr"]), num_training_steps, num_warmup_steps, warmup_lr, min_lr, schedule,
            steps, gamma, warmup_prefix,
        )
        for group in optimizer.param_groups
    ]
    return LambdaLR(optimizer, lr_lambdas)


@dataclass
class SimMIMRecipe:
    """What `SimMIMTrainer` adds to `TrainingArguments` (which holds lr, weight decay, betas, clipping, warmup).

    Args:
        schedule: `"cosine"` (warmup from `warmup_lr`, cosine to `min_lr`), `"multistep"` (warmup, then x`gamma`
            at each of `milestones`), or `"trainer"` (`TrainingArguments.lr_scheduler_type`).
        warmup_lr, min_lr: absolute learning rates (already scaled like the peak learning rate).
        milestones: for `"multistep"`: fractions of the run in (0, 1] or absolute steps.
        stop_on_nonfinite_loss: raise `NonFiniteLossError` naming the first optimizer step with a NaN/inf loss,
            at the next logging, evaluation or checkpoint step (before it saves) or at the end of training: the
            check runs on the device, without a sync per step. `False`: no check at all.
        no_weight_decay_names: substrings of parameter names also exempt from weight decay (an opt-in beyond the
            official exemptions, e.g. `"relative_position_bias_table,mask_token"`); a comma-separated string or a
            sequence.
        warmup_prefix: for `"cosine"`: the cosine runs over the steps after warmup (microsoft/Swin-Transformer's
            fine-tuning) instead of the whole run (microsoft/SimMIM's).
    """

    schedule: str = "cosine"
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    milestones: tuple = (0.875,)
    gamma: float = 0.1
    stop_on_nonfinite_loss: bool = True
    no_weight_decay_names: tuple = ()
    warmup_prefix: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported: use one of {SCHEDULES}.")
        names = self.no_weight_decay_names
        names = names.split(",") if isinstance(names, str) else names
        self.no_weight_decay_names = tuple(name.strip() for name in names if name.strip())
