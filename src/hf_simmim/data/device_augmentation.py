"""The pretraining crop and flip on the device of the batch: DataLoader workers only decode, draw each row's crop
box and flip, and ship the uncropped uint8 image; `DeviceAugmentation` crops, resizes and flips the whole batch
where the model runs (torch ops only: a GPU, or the CPU).

Same draws as the CPU path: `SimMIMTransform(device_crop=True)` draws a row's `(crop box, flip)` with
`AugmentationPreset.draw_geometry` from the row's seeded RNG, first thing, exactly as `AugmentationPreset.augment`
does, so a row gets the same crop box and flip on both paths (and the same mask, drawn as before).

Same pixels as the CPU path, within one grey level: the resize is PIL's own algorithm (`Image.resize` with a box,
as `image_ops.resized_crop` calls it) written as two batched matrix products. For each output pixel PIL weighs the
source pixels within the filter's support around its centre, the support widened by the shrink factor when the
crop shrinks (PIL's antialiasing), pixels outside the image left out and the weights renormalised; it rounds the
weights to 22-bit fixed point and rounds to 8 bits after its first pass and again after the second; the first
pass is the horizontal one, except that Pillow 13 on runs the vertical one first when the image's height shrinks
by more than twice as many pixels as its width (`vertical_pass_first`).
`resampling_matrices` builds those weights (fixed-point rounding included) per row, a flip reverses the rows of the
horizontal matrix, and `resized_crops` applies them with both roundings. What remains is float32 arithmetic
against PIL's integer sums: summed in float64 the output is PIL's, pixel for pixel (tested); in float32 (the
default, fast on any GPU) a value differs from PIL's by one level where a sum falls within ~1e-4 of a half-level.
Measured against Pillow 13 on 8-bit images (tests/test_device_augmentation.py; crops of 48-120 px images to
32-64 px, bilinear and bicubic): at most 1 level, on at most 0.5 % of the values. TF32 matmuls (only when
asked, e.g. `--tf32`) round the weights to 10 bits: about 0.1 level of error, so more values land one level
off. Cropping and then `F.interpolate(antialias=True)` would differ more: it cannot reach the pixels just
outside a crop box, which PIL's filter weighs, and does not round between its passes.

Images must share one size to be stacked into a batch (`collate_fn` refuses a batch of mixed sizes, naming the
fix); the header check before training (`checks.check_image_dataset(..., sizes=)`) finds out whether a dataset's do.
"""

import PIL
import torch


GEOMETRY_KEYS = ("crop_box", "flip")  # what a device-cropped row or batch carries beside its uncropped image
PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point weights for 8-bit images (Resample.c)
PILLOW_CHOOSES_PASS_ORDER = int(PIL.__version__.split(".")[0]) >= 13  # python-pillow/Pillow#9549


def bilinear(distance):
    return (1.0 - distance.abs()).clamp(min=0.0)


def bicubic(distance, a=-0.5):
    """PIL's cubic convolution kernel (a = -0.5), zero from 2 on."""
    x = distance.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


FILTERS = {"bilinear": bilinear, "bicubic": bicubic}


def device_augmentation_problem(augmentation, rgb=True, mask_column=None):
    """Why `augmentation` (an `AugmentationPreset`) cannot run on the device, or None: only the resized crop and
    flip (no RandAugment, no random erasing) of 8-bit RGB images without user masks is implemented there."""
    if augmentation.crop != "random_resized" or augmentation.resample not in FILTERS:
        return (
            f"its crop is {augmentation.crop} ({augmentation.resample}); the device does random_resized crops with "
            f"{' or '.join(FILTERS)} resampling"
        )
    if augmentation.rand_augment or augmentation.random_erasing:
        return "RandAugment and random erasing run on the CPU only"
    if not rgb:
        return "the images keep their own channels; the device path takes 8-bit RGB photos"
    if mask_column:
        return f"user masks (--mask_column {mask_column}) are cropped with their image on the CPU"
    return None


def resampling_matrices(starts, ends, in_size, out_size, resample="bilinear"):
    """`(B, out_size, in_size)` float64 weights that resize the span `[starts[b], ends[b])` of an axis of `in_size`
    pixels to `out_size` pixels as PIL does (`precompute_coeffs` and `normalize_coeffs_8bpc` of Resample.c): output
    pixel `i` is centred at `start + (i + 0.5) * scale` and weighs source pixel `x` by the filter at
    `(x + 0.5 - centre) / max(scale, 1)`, over the pixels of the axis; the weights sum to 1 and are rounded to
    22-bit fixed point."""
    kernel = FILTERS[resample]
    starts = starts.to(torch.float64)
    scale = (ends.to(torch.float64) - starts) / out_size
    filter_scale = scale.clamp(min=1.0)
    outputs = torch.arange(out_size, dtype=torch.float64, device=starts.device)
    centres = starts[:, None] + (outputs + 0.5) * scale[:, None]
    sources = torch.arange(in_size, dtype=torch.float64, device=starts.device)
    weights = kernel((sources + 0.5 - centres[..., None]) / filter_scale[:, None, None])
    weights = weights / weights.sum(dim=-1, keepdim=True)
    one = float(1 << PRECISION_BITS)
    return torch.trunc(weights * one + weights.sign() * 0.5) / one  # PIL rounds half away from zero


def round_to_8_bits(values):
    """PIL's `clip8`: the fixed-point sum plus a half, truncated, clamped to 0-255."""
    return torch.floor(values + 0.5).clamp_(0.0, 255.0)


def vertical_pass_first(height, width, size):
    """Whether PIL resizes a `width` x `height` image to `size` x `size` vertical pass first (Pillow 13's rule, on
    the image's sides, whatever the box; earlier Pillow always starts with the horizontal pass)."""
    shrink_y, shrink_x = height - size, width - size
    return PILLOW_CHOOSES_PASS_ORDER and shrink_y > 0 and shrink_y > 2 * shrink_x


def resized_crops(images, boxes, flips, size, resample="bilinear", dtype=torch.float32):
    """A uint8 `(B, C, H, W)` batch -> uint8 `(B, C, size, size)`: row `b`'s `boxes[b]` (left, top, right, bottom,
    in pixels) resized to `size` x `size` as `PIL.Image.resize(box=...)` does, then mirrored left to right where
    `flips[b]`, on the batch's device, summing in `dtype` (float64: PIL's pixels exactly)."""
    _, _, height, width = images.shape
    boxes = boxes.to(images.device)
    horizontal = resampling_matrices(boxes[:, 0], boxes[:, 2], width, size, resample)
    vertical = resampling_matrices(boxes[:, 1], boxes[:, 3], height, size, resample)
    # flipping the result = reading its columns in reverse order
    horizontal = torch.where(flips.to(images.device).view(-1, 1, 1), horizontal.flip(1), horizontal)
    horizontal, vertical, pixels = horizontal.to(dtype), vertical.to(dtype), images.to(dtype)
    if vertical_pass_first(height, width, size):
        columns = round_to_8_bits(torch.einsum("bchw,bih->bciw", pixels, vertical))
        resized = torch.einsum("bciw,bjw->bcij", columns, horizontal)
    else:
        rows = round_to_8_bits(torch.einsum("bchw,bjw->bchj", pixels, horizontal))
        resized = torch.einsum("bchj,bih->bcij", rows, vertical)
    return round_to_8_bits(resized).to(torch.uint8)


class DeviceAugmentation:
    """The crop and flip of `augmentation` (an `AugmentationPreset`) on the device, as a step of the trainer's
    input preparation: `DeviceAugmentation(preset)(inputs)` takes a batch already on the device and, when it
    carries `crop_box` and `flip` (training batches of `SimMIMTransform(device_crop=True)`), returns it with
    `pixel_values` cropped, resized and flipped (uint8, at the preset's size: the trainer normalises it as any
    uint8 batch) and the geometry removed; other batches (evaluation centre crops) come back as they are."""

    def __init__(self, augmentation):
        problem = device_augmentation_problem(augmentation)
        if problem:
            raise ValueError(
                f"The {augmentation.name} augmentation cannot run on the device: {problem}. Use "
                "--augmentation_device cpu."
            )
        self.augmentation = augmentation

    def __call__(self, inputs):
        if "crop_box" not in inputs:
            return inputs
        preset = self.augmentation
        output = {name: value for name, value in inputs.items() if name not in GEOMETRY_KEYS}
        output["pixel_values"] = resized_crops(
            inputs["pixel_values"], inputs["crop_box"], inputs["flip"], preset.image_size, preset.resample
        )
        return output
