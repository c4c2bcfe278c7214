"""Trainer callbacks of a SimMIM run: images/s in the logs (`ThroughputCallback`), the epoch that seeds crops and
masks (`EpochCallback`), the exact resumption of a streamed run (`StreamResumeCallback`), and reconstruction
pictures at each evaluation and at the end (`ReconstructionCallback`)."""

import json
import logging
import math
import os
import time

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .optim import total_train_batch_size

logger = logging.getLogger(__name__)


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
    """Tells datasets with `set_epoch` (e.g. `SeededImageDataset`) which epoch starts, so crops and masks
    are drawn from (seed, epoch, row) and a resumed run sees exactly the data of an uninterrupted one."""

    def __init__(self, *datasets):
        self.datasets = [d for d in datasets if hasattr(d, "set_epoch")]

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(math.floor((state.epoch or 0.0) + 1e-6))
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


STREAM_LAYOUT_FILE = "stream_layout.json"


def check_stream_layout(checkpoint, layout):
    """Refuse to resume a streamed run from `checkpoint` with another `layout` (`pretraining.stream_layout`) than
    the one its checkpoint recorded: the replayed stream would not be the one it trained on."""
    path = os.path.join(checkpoint, STREAM_LAYOUT_FILE)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: the stream is replayed as if its layout had not changed.", checkpoint,
                       STREAM_LAYOUT_FILE)
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    changed = [f"{name} {saved.get(name)} -> {value}" for name, value in layout.items() if saved.get(name) != value]
    if changed:
        raise ValueError(
            f"{checkpoint} was trained on a stream read with another layout ({'; '.join(changed)}), which orders its "
            "images: resume with the checkpoint's values for an exact continuation, or pass --ignore_data_skip to "
            "start the stream again from its beginning."
        )


class StreamResumeCallback(TrainerCallback):
    """Exact resumption of a streamed run (`data.streaming.StreamingImageDataset`): a resumed run's stream replays,
    undecoded, the batches its checkpoint was trained on (`replay`; the Trainer's own skipping, which would decode
    and augment them, is off), and every checkpoint records the stream's `layout` (`check_stream_layout`)."""

    def __init__(self, dataset, layout, replay=True):
        self.dataset, self.layout, self.replay = dataset, layout, replay

    def on_train_begin(self, args, state, control, **kwargs):
        if self.replay:
            self.dataset.start_batch = state.global_step * args.gradient_accumulation_steps

    def on_save(self, args, state, control, **kwargs):
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(checkpoint):
            with open(os.path.join(checkpoint, STREAM_LAYOUT_FILE), "w", encoding="utf-8") as handle:
                json.dump(self.layout, handle, indent=2)


class ReconstructionCallback(TrainerCallback):
    """Draws the reconstruction grid of a fixed batch of images at each evaluation and at the end of training:
    `OUTPUT/reconstruction.png` (latest), `OUTPUT/reconstructions/step-NNNNNN.png`, and TensorBoard (tag
    `reconstruction`) when the Trainer reports to it.

    The forward pass runs on every process (sharded models need them all); only the main process writes.
    """

    def __init__(
        self, pixel_values, bool_masked_pos, image_mean, image_std, output_dir=None, writer=None,
        display_channels=None, stretch=False,
    ):
        if pixel_values.shape[0] == 0:
            raise ValueError("ReconstructionCallback needs at least one image.")
        self.pixel_values = pixel_values
        self.bool_masked_pos = bool_masked_pos
        self.image_mean = image_mean
        self.image_std = image_std
        self.output_dir = output_dir
        self.writer = writer  # a SummaryWriter, or a callable returning one (or None)
        self.display_channels = display_channels  # see reporting.pictures.display_view
        self.stretch = stretch
        self.last_path = None

    @classmethod
    def from_dataset(cls, dataset, num_images, image_processor, **kwargs):
        """The first `num_images` rows of a `SeededImageDataset` (built with an eval transform: centre crop,
        masks fixed by its seed) as the fixed batch to draw; images that are not RGB photos contrast-stretched."""
        batch = dataset.batch(range(min(num_images, len(dataset))))
        return cls(
            batch["pixel_values"],
            batch["bool_masked_pos"],
            image_processor.image_mean,
            image_processor.image_std,
            stretch=not image_processor.converts_to_rgb,
            **kwargs,
        )

    def _draw(self, args, state, model):
        from ..reporting.pictures import describe_view, display_view, reconstruct, reconstruction_grid

        if model is None:
            return None
        reconstruction = reconstruct(model, self.pixel_values, self.bool_masked_pos)
        if not state.is_world_process_zero:
            return None
        unwrapped = getattr(model, "module", model)
        channels = display_view(self.pixel_values.shape[1], self.display_channels)
        view = f", {describe_view(channels, self.stretch)}" if self.stretch else ""
        grid = reconstruction_grid(
            self.pixel_values,
            self.bool_masked_pos,
            reconstruction,
            patch_size=unwrapped.config.patch_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            title=f"step {state.global_step}, {unwrapped.config.mask_strategy} masks{view}",
            display_channels=channels,
            stretch=self.stretch,
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
