"""SimMIM mask generators: the official algorithm (microsoft/SimMIM `data/data_simmim.py`) and four alternatives.

A mask has one entry per model patch, 1 = masked. `mask_strategy` chooses how it is drawn:

- `random_block` (the official one, the default): split the image into `mask_patch_size` squares, mask a random
  `ceil(mask_ratio * squares)` of them, and upsample that coarse grid to the patch grid by repetition.
- `random_patch` (MAE): mask a random `ceil(mask_ratio * patches)` of the model patches.
- `grid`: a checkerboard of `mask_patch_size` squares, its phase (which colour is masked) drawn at random.
  `mask_ratio` must be 0.5; with an odd number of squares per side one colour has one square more.
- `block_wise` (BEiT, `masking_generator.py`): rectangles of random area and aspect ratio in [0.3, 1 / 0.3] are
  added until `ceil(mask_ratio * patches)` patches are masked. A block is kept only if it masks at least one new
  patch and no more than the count still missing, so the mask never exceeds the target; after 10 failed
  placements in a row the mask is returned as it is, so the achieved ratio is at most `mask_ratio` and on
  average slightly below it (tests/test_masking.py measures it).
- `center`: a centred box of `ceil(mask_ratio * patches)` patches, as square as possible: `ceil(sqrt(count))`
  columns, full rows, and the remainder centred in one last row. The same mask every draw.
- `user`: each image's own mask (a mask image or array of the image's size, nonzero = masked), brought to the model's
  size with the image and snapped to the patch grid by `snap_mask_to_patches`: a patch is masked when at least half
  of its pixels are (`USER_MASK_MIN_SHARE`); `evaluation_patch_mask` does both for the evaluation view.
  `mask_ratio` plays no part. The generator cannot draw these: the data path (`SimMIMTransform(mask_column=...)`,
  `run_mim.py --mask_column`) and the image processor (`processor(images, masks=...)`) read them.
"""

import math

import numpy as np
import torch
from PIL import Image

from .image_transforms import center_crop, map_channels, resize_shorter_side

MASK_STRATEGIES = ("random_block", "random_patch", "grid", "block_wise", "center", "user")
# A patch of a user mask is masked when at least this share of its pixels is: the majority of what the patch shows is
# hidden. A lower share would grow a thin defect line into a band of whole patches, a higher one would show the
# model most of an occluded region; at exactly half, masking is the safe side (the loss only sees masked patches).
USER_MASK_MIN_SHARE = 0.5
# BEiT's block-wise masking: blocks cover at least 16 patches (fewer when the target itself is smaller), aspect
# ratios lie in [0.3, 1 / 0.3], and a mask is finished after this many placements in a row add nothing.
BLOCK_MIN_PATCHES = 16
BLOCK_MIN_ASPECT = 0.3
BLOCK_ATTEMPTS = 10


def check_mask_strategy(mask_strategy, mask_ratio):
    """Refuse an unknown `mask_strategy`, or a `mask_ratio` it cannot draw."""
    if mask_strategy not in MASK_STRATEGIES:
        raise ValueError(f"mask_strategy={mask_strategy!r} is not supported: use one of {MASK_STRATEGIES}.")
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} must lie strictly between 0 and 1 (the paper uses 0.6).")
    if mask_strategy == "grid" and mask_ratio != 0.5:
        raise ValueError(
            f"mask_ratio={mask_ratio} with mask_strategy='grid': a checkerboard masks half of the squares; set "
            "mask_ratio=0.5 or choose another mask_strategy."
        )


def snap_mask_to_patches(pixel_mask, patch_size, min_share=USER_MASK_MIN_SHARE):
    """An `(H, W)` pixel mask (bool, or floats in [0, 1]: the masked share of each pixel) -> the bool
    `(H / patch_size, W / patch_size)` patch mask: a patch is masked when the mean of its pixels is at least
    `min_share`."""
    pixel_mask = np.asarray(pixel_mask, dtype=np.float32)
    height, width = pixel_mask.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"a {width}x{height} mask does not split into {patch_size}-pixel patches: give a mask of the model's "
            "image size (a multiple of patch_size)"
        )
    patches = pixel_mask.reshape(height // patch_size, patch_size, width // patch_size, patch_size)
    return patches.mean(axis=(1, 3)) >= min_share


def evaluation_patch_mask(pixel_mask, image_size, patch_size, crop_pct=1.0, resize=True):
    """An image's user mask, `(H, W)` (bool, or floats in [0, 1]), in that image's evaluation view -> the bool
    `(image_size / patch_size,) * 2` patch mask. The mask is resized as the image is (shorter side
    `int(image_size / crop_pct)`; not with `resize=False`) but with a box filter, so each pixel holds the masked
    share of its area, centre-cropped to `image_size`, then snapped by the half rule (`snap_mask_to_patches`)."""

    def resize_and_crop(channel):
        if resize:
            channel = resize_shorter_side(channel, int(image_size / crop_pct), Image.BOX)
        return center_crop(channel, image_size)

    view = map_channels(np.asarray(pixel_mask, dtype=np.float32)[None], resize_and_crop)[0]
    return snap_mask_to_patches(view, patch_size)


def mask_generator_for(source, seed=None):
    """The `SimMIMMaskGenerator` of a `SimMIMConfig`, a `SimMIMImageProcessor` or a dict of their fields
    (`image_size`, `mask_patch_size`, `patch_size`, `mask_ratio`, optional `mask_strategy`)."""

    def read(name, default=None):
        return source.get(name, default) if isinstance(source, dict) else getattr(source, name, default)

    return SimMIMMaskGenerator(
        read("image_size"),
        read("mask_patch_size"),
        read("patch_size"),
        read("mask_ratio"),
        # configs and processors saved before mask strategies existed drew the official masks
        mask_strategy=read("mask_strategy") or "random_block",
        seed=seed,
    )


class SimMIMMaskGenerator:
    """Draws masks of shape `(image_size / patch_size,) * 2` with one of `MASK_STRATEGIES` (module docstring).

    Args:
        input_size: image side in pixels.
        mask_patch_size: side of a masked square in pixels (must divide `input_size`).
        model_patch_size: the encoder's patch size (must divide `mask_patch_size`).
        mask_ratio: fraction to mask, in (0, 1) (exactly 0.5 for `grid`).
        mask_strategy: one of `MASK_STRATEGIES`; `random_block`, the official algorithm, by default.
        seed: if given, masks come from a private `torch.Generator` seeded with it (reproducible evaluation
            masks); otherwise from torch's global RNG, which `Trainer`/`set_seed` and every DataLoader worker seed.
    """

    def __init__(
        self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6, mask_strategy="random_block",
        seed=None,
    ):
        if input_size % mask_patch_size:
            raise ValueError(
                f"image size {input_size} is not a multiple of mask_patch_size={mask_patch_size}: choose a "
                "mask_patch_size that divides the image size."
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} is not a multiple of patch_size={model_patch_size}: a masked "
                "square must cover whole patches."
            )
        check_mask_strategy(mask_strategy, mask_ratio)
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.mask_strategy = mask_strategy
        # the official generator's attributes: squares per side, patches per square side, squares, masked squares
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @classmethod
    def from_config(cls, config, seed=None):
        return mask_generator_for(config, seed=seed)

    @property
    def grid_size(self):
        return self.rand_size * self.scale

    @property
    def patch_count(self):
        """How many model patches a mask of the patch-level strategies (`random_patch`, `block_wise`, `center`)
        aims at: `ceil(mask_ratio * patches)`."""
        return int(math.ceil(self.grid_size**2 * self.mask_ratio))

    def __call__(self, rng=None, generator=None):
        """One mask, a `(grid, grid)` bool numpy array.

        `rng` may be a `numpy.random.RandomState`/`Generator` to replay the official code's numpy draws
        (`random_block` only); `generator` a `torch.Generator`; by default the mask generator's own RNG is used.
        """
        if rng is not None:
            if self.mask_strategy != "random_block":
                raise ValueError(
                    f"rng replays the official numpy draws of mask_strategy='random_block'; mask_strategy="
                    f"{self.mask_strategy!r} draws from a torch.Generator: pass generator= instead."
                )
            return self._upsample(np.asarray(rng.permutation(self.token_count)[: self.mask_count]))
        if self.mask_strategy == "user":
            raise ValueError(
                "mask_strategy='user' takes each image's mask from the data, it draws none: give masks with "
                "SimMIMTransform(mask_column=...) or run_mim.py --mask_column NAME (or the image processor's masks=), "
                "or choose another mask_strategy."
            )
        generator = generator if generator is not None else self.generator
        draw = {
            "random_block": self._random_block,
            "random_patch": self._random_patch,
            "grid": self._grid,
            "block_wise": self._block_wise,
            "center": self._center,
        }[self.mask_strategy]
        return draw(generator)

    def _upsample(self, chosen_squares):
        """Flat indices of masked squares -> the `(grid, grid)` patch mask."""
        mask = np.zeros(self.token_count, dtype=bool)
        mask[chosen_squares] = True
        mask = mask.reshape(self.rand_size, self.rand_size)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def _random_block(self, generator):
        return self._upsample(torch.randperm(self.token_count, generator=generator)[: self.mask_count].numpy())

    def _random_patch(self, generator):
        chosen = torch.randperm(self.grid_size**2, generator=generator)[: self.patch_count].numpy()
        mask = np.zeros(self.grid_size**2, dtype=bool)
        mask[chosen] = True
        return mask.reshape(self.grid_size, self.grid_size)

    def _grid(self, generator):
        phase = int(torch.randint(2, (1,), generator=generator))
        rows, columns = np.indices((self.rand_size, self.rand_size))
        return self._upsample(np.flatnonzero((rows + columns) % 2 == phase))

    def _center(self, generator):
        count, grid = self.patch_count, self.grid_size
        columns = math.ceil(math.sqrt(count))
        full_rows, remainder = divmod(count, columns)
        top, left = (grid - full_rows - (remainder > 0)) // 2, (grid - columns) // 2
        mask = np.zeros((grid, grid), dtype=bool)
        mask[top : top + full_rows, left : left + columns] = True
        if remainder:
            start = left + (columns - remainder) // 2
            mask[top + full_rows, start : start + remainder] = True
        return mask

    def _block_wise(self, generator):
        mask = np.zeros((self.grid_size, self.grid_size), dtype=bool)
        masked = 0
        while masked < self.patch_count:
            added = self._add_block(mask, self.patch_count - masked, generator)
            if added == 0:
                break
            masked += added
        return mask

    def _add_block(self, mask, missing, generator):
        """BEiT's `_mask`: up to `BLOCK_ATTEMPTS` tries to mask one rectangle that adds between 1 and `missing`
        patches; returns how many it added (0: no try succeeded)."""
        grid = self.grid_size
        min_area = min(BLOCK_MIN_PATCHES, self.patch_count)
        log_aspect = (math.log(BLOCK_MIN_ASPECT), -math.log(BLOCK_MIN_ASPECT))
        for _ in range(BLOCK_ATTEMPTS):
            area_draw, aspect_draw = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            area = min_area + (missing - min_area) * area_draw  # uniform between the two, either way round
            aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * aspect_draw)
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (width < grid and height < grid):  # BEiT keeps blocks strictly inside the grid
                continue
            top = int(torch.randint(grid - height + 1, (1,), generator=generator))
            left = int(torch.randint(grid - width + 1, (1,), generator=generator))
            block = mask[top : top + height, left : left + width]
            added = block.size - int(block.sum())
            if 0 < added <= missing:
                block[...] = True
                return added
        return 0

    def __repr__(self):
        if self.mask_strategy == "user":
            masked = "each image's own mask, snapped to the patch grid"
        elif self.mask_strategy == "random_block":
            masked = f"{self.mask_count} of {self.token_count} squares"
        else:
            masked = f"{self.patch_count} of {self.grid_size**2} patches"
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}, mask_strategy="
            f"{self.mask_strategy!r}: {masked})"
        )


def mask_from_image(image):
    """A mask image -> bool `(H, W)`, True where any colour band is nonzero. The alpha band is left out: it says
    nothing about the mask (an opaque "keep" area has alpha 255 everywhere); a palette image counts by its colours,
    not its indices. Training's user masks and the inpainting pipeline read mask images by this one rule."""
    if image.mode == "P":
        image = image.convert("RGBA")
    bands = [index for index, band in enumerate(image.getbands()) if band != "A"]
    if len(bands) == len(image.getbands()) == 1:
        return np.asarray(image) != 0
    return np.stack([np.asarray(image.getchannel(index)) != 0 for index in bands]).any(axis=0)


def bool_mask(mask, name="the mask"):
    """A mask image (read by `mask_from_image`), or an `(H, W)` array or tensor of bools or 0/1 integers (True / 1 =
    masked) -> bool `(H, W)`; anything else is a `ValueError` naming `name`. The image processor's `masks=` and the
    inpainting pipeline read masks by this one rule."""
    if isinstance(mask, Image.Image):
        return mask_from_image(mask)
    if torch.is_tensor(mask):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        shown = f"an array of shape {mask.shape}" if isinstance(mask, np.ndarray) else f"a {type(mask).__name__}"
        raise ValueError(
            f"{name} is {shown}: give a mask image or an (H, W) array or tensor of bools or 0/1 integers (True / 1 = "
            "masked)."
        )
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
        raise ValueError(
            f"{name} holds {mask.dtype} values in [{mask.min()}, {mask.max()}]: give bools or 0/1 integers (True / 1 = "
            "masked), e.g. `mask > 0`, or a mask image."
        )
    return mask.astype(bool)
