"""Pictures of a SimMIM run, drawn with PIL only (no matplotlib).

- `reconstruction_grid`: one row per image: original | masked input | reconstruction | reconstruction pasted
  into the visible pixels (what the model predicts where it could not see, the real pixels elsewhere), captioned
  `RECONSTRUCTION_CAPTION`; `panel_grid` lays out any such table of images;
- `loss_curve`: training (and evaluation) loss against the optimizer step, with axes and labels;
- `reconstruct_images`: the grid for image files and a checkpoint (`hf-simmim reconstruct`); `load_images` reads
  and preprocesses them (`hf-simmim attention` too).
"""

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..models.image_transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

COLUMNS = ("original", "masked input", "reconstruction", "rec. + visible")
MASK_GREY = 128
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MIN_CELL = 96  # small images (CIFAR's 32 px) are enlarged, pixel by pixel, to at least this size
# The loss sees only the masked pixels, so the reconstruction of visible patches is untrained: readers mistake it for
# a failure unless the picture says so.
RECONSTRUCTION_CAPTION = "reconstruction: only masked patches are trained (visible ones may look like noise)"


def _font():
    return ImageFont.load_default()


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


# ---------------------------------------------------------------------------------------------- tensors -> pixels
# Images that are not RGB photos are shown contrast-stretched: each shown channel is mapped linearly from these
# percentiles of the original images of the picture (the same mapping in every column, so they compare) to 0-255.
STRETCH_PERCENTILES = (1.0, 99.0)


def display_view(num_channels, display_channels=None):
    """The channels a picture shows, as 1 (grey) or 3 (red, green, blue) indices: `display_channels` when given,
    else all of an RGB image, the one of a grayscale image, or the first three. Raises `ValueError` naming
    `--display_channels` for indices that are not channels of the image."""
    if display_channels is None:
        return (0, 0, 0) if num_channels < 3 else (0, 1, 2)
    channels = tuple(int(c) for c in display_channels)
    if len(channels) not in (1, 3) or not all(0 <= c < num_channels for c in channels):
        raise ValueError(
            f"--display_channels {' '.join(map(str, channels))}: give 3 channels to show as red, green and blue, or "
            f"1 to show as grey, each in 0..{num_channels - 1} (the model takes {num_channels} channels)."
        )
    return channels * 3 if len(channels) == 1 else channels


def describe_view(channels, stretch):
    """How a picture shows its images, for titles, e.g. "channels 3, 2, 1 as RGB, stretched 1-99%"."""
    shown = f"channel {channels[0]} as grey" if len(set(channels)) == 1 else f"channels {', '.join(map(str, channels))} as RGB"
    return shown + (", stretched {:g}-{:g}%".format(*STRETCH_PERCENTILES) if stretch else "")


def unnormalize(pixel_values, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD):
    """Normalised `(B, C, H, W)` (tensor or array) -> float32 array `x * std + mean` (pixels x rescale factor)."""
    array = pixel_values.detach().float().cpu().numpy() if torch.is_tensor(pixel_values) else np.asarray(pixel_values)
    mean = np.asarray(image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(image_std, dtype=np.float32).reshape(1, -1, 1, 1)
    return array * std + mean


def stretch_limits(values, channels):
    """`(low, high)` arrays, one entry per shown channel: the `STRETCH_PERCENTILES` of `values` `(B, C, H, W)`."""
    low, high = np.percentile(values[:, list(channels)], STRETCH_PERCENTILES, axis=(0, 2, 3))
    return low, np.maximum(high, low + 1e-6)


def to_display(values, channels=(0, 1, 2), limits=None):
    """`(B, C, H, W)` values -> uint8 `(B, H, W, 3)`: the `channels` shown, `limits` (`stretch_limits`; None:
    [0, 1]) mapped to 0-255."""
    shown = values[:, list(channels)]
    if limits is not None:
        low, high = (np.asarray(limit, dtype=np.float32).reshape(1, -1, 1, 1) for limit in limits)
        shown = (shown - low) / (high - low)
    return np.clip(shown * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def denormalize(
    pixel_values, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, display_channels=None, stretch=False
):
    """Normalised `(B, C, H, W)` (tensor or array) -> uint8 `(B, H, W, 3)` array of the channels `display_view`
    shows (an RGB image as it is, a grayscale one as grey), contrast-stretched when `stretch`."""
    values = unnormalize(pixel_values, image_mean, image_std)
    channels = display_view(values.shape[1], display_channels)
    return to_display(values, channels, stretch_limits(values, channels) if stretch else None)


def pixel_mask(bool_masked_pos, patch_size, batch_size):
    """A `(B, num_patches)` or `(B, g, g)` patch mask -> bool `(B, H, W)` pixel mask (True = masked)."""
    mask = torch.as_tensor(np.asarray(bool_masked_pos) if not torch.is_tensor(bool_masked_pos) else bool_masked_pos)
    mask = mask.reshape(batch_size, -1).bool().cpu()
    grid = int(round(math.sqrt(mask.shape[1])))
    mask = mask.reshape(batch_size, grid, grid)
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).numpy()


@torch.no_grad()
def reconstruct(model, pixel_values, bool_masked_pos):
    """Run a SimMIM model (any wrapper) in eval mode on one batch; return the float32 CPU reconstruction."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        dtype = param.dtype if param.is_floating_point() else torch.float32
        outputs = model(
            pixel_values=pixel_values.to(param.device, dtype), bool_masked_pos=bool_masked_pos.to(param.device)
        )
    finally:
        model.train(was_training)
    reconstruction = outputs.reconstruction if hasattr(outputs, "reconstruction") else outputs[1]
    return reconstruction.detach().float().cpu()


# ---------------------------------------------------------------------------------------------- the grid
def reconstruction_panels(
    pixel_values,
    bool_masked_pos,
    reconstruction,
    patch_size,
    image_mean=IMAGENET_DEFAULT_MEAN,
    image_std=IMAGENET_DEFAULT_STD,
    display_channels=None,
    stretch=False,
):
    """The four uint8 `(B, H, W, 3)` arrays of the grid's columns: original, masked input (masked pixels grey),
    reconstruction, and reconstruction in the masked pixels + original in the visible ones. Images of any channel
    count are shown through `display_view(channels, display_channels)`, contrast-stretched when `stretch` (images
    that are not RGB photos: `STRETCH_PERCENTILES`)."""
    batch_size = pixel_values.shape[0]
    values = unnormalize(pixel_values, image_mean, image_std)
    predicted_values = unnormalize(reconstruction, image_mean, image_std)
    if predicted_values.shape != values.shape:
        raise ValueError(
            f"reconstruction has shape {tuple(reconstruction.shape)} but the images {tuple(pixel_values.shape)}."
        )
    channels = display_view(values.shape[1], display_channels)
    limits = stretch_limits(values, channels) if stretch else None
    original, predicted = to_display(values, channels, limits), to_display(predicted_values, channels, limits)
    mask = pixel_mask(bool_masked_pos, patch_size, batch_size)[..., None]
    if mask.shape[1:3] != original.shape[1:3]:
        raise ValueError(
            f"the mask covers {mask.shape[1]}x{mask.shape[2]} pixels with patch_size={patch_size}, but the images "
            f"are {original.shape[1]}x{original.shape[2]}."
        )
    masked_input = np.where(mask, np.uint8(MASK_GREY), original)
    pasted = np.where(mask, predicted, original)
    return original, masked_input, predicted, pasted


def panel_grid(panels, columns, title=None, caption=None, min_cell=MIN_CELL):
    """Uint8 `(B, H, W, 3)` arrays, one per column, as a PIL picture: a row per image, the `columns` names above
    them, and on top `title` and `caption` lines (each where given). Small images are enlarged pixel by pixel."""
    batch_size, height, width = panels[0].shape[:3]
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_w, cell_h, gap = width * scale, height * scale, 4
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(_text_size(probe, name, font)[1] for name in columns) + 6
    cell_w = max(cell_w, max(_text_size(probe, name, font)[0] for name in columns) + 4)
    lines = [line for line in (title, caption) if line]
    top = text_h * (1 + len(lines)) + gap
    grid_w = len(columns) * (cell_w + gap) + gap
    canvas_w = max([grid_w] + [_text_size(probe, line, font)[0] + 2 * gap for line in lines])
    canvas = Image.new("RGB", (canvas_w, top + batch_size * (cell_h + gap)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((gap, 2 + index * text_h), line, fill=TEXT, font=font)
    for column, name in enumerate(columns):
        x = gap + column * (cell_w + gap)
        text_w = _text_size(draw, name, font)[0]
        draw.text((x + (cell_w - text_w) // 2, top - text_h), name, fill=TEXT, font=font)
    for row in range(batch_size):
        y = top + row * (cell_h + gap)
        for column, panel in enumerate(panels):
            tile = Image.fromarray(panel[row]).resize((width * scale, height * scale), Image.NEAREST)
            x = gap + column * (cell_w + gap) + (cell_w - width * scale) // 2
            canvas.paste(tile, (x, y))
    return canvas


def reconstruction_grid(
    pixel_values,
    bool_masked_pos,
    reconstruction,
    patch_size,
    image_mean=IMAGENET_DEFAULT_MEAN,
    image_std=IMAGENET_DEFAULT_STD,
    title=None,
    min_cell=MIN_CELL,
    caption=RECONSTRUCTION_CAPTION,
    display_channels=None,
    stretch=False,
):
    """The picture: a row per image, the four `COLUMNS`, a header (`title`, `caption`) on top. Returns a PIL image.
    `display_channels` and `stretch`: how images of any channel count are shown (`reconstruction_panels`)."""
    panels = reconstruction_panels(
        pixel_values, bool_masked_pos, reconstruction, patch_size, image_mean, image_std, display_channels, stretch
    )
    return panel_grid(panels, COLUMNS, title=title, caption=caption, min_cell=min_cell)


# ---------------------------------------------------------------------------------------------- the loss curve
def _nice_ticks(low, high, count=5):
    if high <= low:
        high = low + (abs(low) or 1.0) * 0.1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=10 * magnitude)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _format(value):
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.4g}"


class _Frame:
    """The plotting area of a `size` image with room for tick labels, mapping (step, loss) to pixels."""

    def __init__(self, size, x_ticks, y_ticks, margins=(70, 20, 40, 55)):
        self.width, self.height = size
        self.left, self.right, self.top, self.bottom = margins
        self.x_ticks, self.y_ticks = x_ticks, y_ticks

    def to_xy(self, step, value):
        x_lo, x_hi, y_lo, y_hi = self.x_ticks[0], self.x_ticks[-1], self.y_ticks[0], self.y_ticks[-1]
        x = self.left + (step - x_lo) / ((x_hi - x_lo) or 1) * (self.width - self.left - self.right)
        y = self.height - self.bottom - (value - y_lo) / ((y_hi - y_lo) or 1) * (self.height - self.top - self.bottom)
        return x, y


GRID_COLOUR, AXIS_COLOUR = (225, 225, 225), (60, 60, 60)


def _draw_axes(draw, font, frame, title):
    f = frame
    for tick in f.y_ticks:
        _, y = f.to_xy(f.x_ticks[0], tick)
        draw.line([(f.left, y), (f.width - f.right, y)], fill=GRID_COLOUR)
        tw, th = _text_size(draw, _format(tick), font)
        draw.text((f.left - 6 - tw, y - th / 2 - 1), _format(tick), fill=TEXT, font=font)
    for tick in f.x_ticks:
        x, _ = f.to_xy(tick, f.y_ticks[0])
        draw.line([(x, f.top), (x, f.height - f.bottom)], fill=GRID_COLOUR)
        tw, _ = _text_size(draw, _format(tick), font)
        draw.text((x - tw / 2, f.height - f.bottom + 6), _format(tick), fill=TEXT, font=font)
    corner = [(f.left, f.top), (f.left, f.height - f.bottom), (f.width - f.right, f.height - f.bottom)]
    draw.line(corner, fill=AXIS_COLOUR, width=2)
    tw, _ = _text_size(draw, "optimizer step", font)
    draw.text(((f.left + f.width - f.right - tw) / 2, f.height - f.bottom + 24), "optimizer step", fill=TEXT, font=font)
    draw.text((8, f.top - 22), "loss", fill=TEXT, font=font)
    tw, _ = _text_size(draw, title, font)
    draw.text(((f.width - tw) / 2, 10), title, fill=TEXT, font=font)


def _draw_series(draw, font, frame, series):
    """`series`: `(name, colour, [(step, value)], dots)` each; lines (dots where asked) and a legend."""
    for _, colour, data, dots in series:
        xy = [frame.to_xy(s, v) for s, v in data]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if dots or len(xy) == 1:
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    legend_x, legend_y = frame.width - frame.right - 116, frame.top + 6
    box = [legend_x, frame.top + 2, frame.width - frame.right - 4, frame.top + 8 + 16 * len(series)]
    draw.rectangle(box, fill=BACKGROUND, outline=AXIS_COLOUR)
    for name, colour, _, _ in series:
        draw.line([(legend_x + 6, legend_y + 6), (legend_x + 30, legend_y + 6)], fill=colour, width=3)
        draw.text((legend_x + 36, legend_y), name, fill=TEXT, font=font)
        legend_y += 16


def loss_curve(log_history, title="SimMIM pretraining loss", size=(720, 440)):
    """Training `loss` (line) and `eval_loss` (line with dots) against `step`, from `Trainer.state.log_history`.
    Returns a PIL image; raises `ValueError` if the history holds no loss."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e and math.isfinite(e["loss"])]
    evals = [
        (e["step"], e["eval_loss"])
        for e in log_history
        if "eval_loss" in e and "step" in e and math.isfinite(e["eval_loss"])
    ]
    if not train and not evals:
        raise ValueError("log_history holds no 'loss' or 'eval_loss' entry to plot (log at least once).")
    points = train + evals
    x_ticks = _nice_ticks(min(0, min(p[0] for p in points)), max(p[0] for p in points) or 1)
    y_ticks = _nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    image = Image.new("RGB", size, BACKGROUND)
    draw, font, frame = ImageDraw.Draw(image), _font(), _Frame(size, x_ticks, y_ticks)
    _draw_axes(draw, font, frame, title)
    series = [("train loss", (31, 119, 180), train, False), ("eval loss", (255, 127, 14), evals, True)]
    _draw_series(draw, font, frame, [entry for entry in series if entry[2]])
    return image


def save_loss_curve(log_history, path, **kwargs):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    loss_curve(log_history, **kwargs).save(path)
    return path


# ---------------------------------------------------------------------------------------------- from files
def check_image_files(image_paths):
    if not image_paths:
        raise ValueError("No image given: pass at least one image file.")
    missing = [path for path in image_paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"Image file(s) not found: {', '.join(map(str, missing))}.")


def read_image_file(path, processor):
    """An image file as `processor` reads it: a PIL image for RGB photos, else a CHW array of its own channels
    (`data.pixels`: 16-bit, `.npy`, multi-band TIFF)."""
    from ..data.image_ops import decode_image
    from ..data.pixels import read_pixels

    return decode_image(str(path)) if processor.converts_to_rgb else read_pixels(str(path), processor.num_channels)


def load_images(checkpoint, config, image_paths, **processor_kwargs):
    """`(processor, batch)`: image files preprocessed by the checkpoint's image processor (one built from `config`
    where it has none), called with `processor_kwargs`."""
    from ..models.image_processing_simmim import SimMIMImageProcessor

    check_image_files(image_paths)
    processor = SimMIMImageProcessor.from_checkpoint(checkpoint, config)
    images = [read_image_file(path, processor) for path in image_paths]
    if not processor.converts_to_rgb:
        processor_kwargs.setdefault("input_data_format", "channels_first")
    return processor, processor(images, return_tensors="pt", **processor_kwargs)


def reconstruct_images(checkpoint, image_paths, output_path, mask_seed=0, display_channels=None, mask_strategy=None):
    """Reconstruct image files with a SimMIM checkpoint and save the grid as `output_path` (returned).

    Masks are drawn with `mask_seed` by `mask_strategy` (default: the checkpoint's), so the same call gives the same
    picture. The checkpoint's image processor is used if it has one, otherwise one built from its config. Images
    that are not RGB photos are shown through `display_channels` (`display_view`), contrast-stretched.
    """
    from ..models.modeling_simmim import SimMIMForMaskedImageModeling

    model = SimMIMForMaskedImageModeling.from_pretrained(checkpoint)
    mask_strategy = mask_strategy or model.config.mask_strategy
    if mask_strategy == "user":
        raise ValueError(
            f"{checkpoint} was pretrained with user masks (mask_strategy='user'), which cannot be drawn for new "
            "images: pass --mask_strategy NAME (e.g. random_block) to reconstruct them with drawn masks."
        )
    channels = display_view(model.config.num_channels, display_channels)
    processor, batch = load_images(
        checkpoint, model.config, image_paths, return_bool_masked_pos=True, mask_seed=mask_seed,
        mask_strategy=mask_strategy,
    )
    stretch = not processor.converts_to_rgb
    reconstruction = reconstruct(model, batch["pixel_values"], batch["bool_masked_pos"])
    name = os.path.basename(os.path.normpath(str(checkpoint)))
    view = "" if processor.converts_to_rgb else f", {describe_view(channels, stretch)}"
    grid = reconstruction_grid(
        batch["pixel_values"],
        batch["bool_masked_pos"],
        reconstruction,
        model.config.patch_size,
        processor.image_mean,
        processor.image_std,
        title=f"{name}, {mask_strategy} masks{view}",
        display_channels=channels,
        stretch=stretch,
    )
    directory = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(directory, exist_ok=True)
    grid.save(output_path)
    return output_path
