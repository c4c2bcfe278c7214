"""The SimMIM mask generator, exactly the official algorithm (microsoft/SimMIM `data/data_simmim.py`).

Split the image into `mask_patch_size` squares, mask a random `ceil(mask_ratio * count)` of them, and upsample
that coarse grid to the model's patch grid by repetition. The result has one entry per model patch, 1 = masked.
"""

import math

import numpy as np
import torch


class SimMIMMaskGenerator:
    """Draws SimMIM masks of shape `(image_size / patch_size,) * 2`.

    Args:
        input_size: image side in pixels.
        mask_patch_size: side of a masked square in pixels (must divide `input_size`).
        model_patch_size: the encoder's patch size (must divide `mask_patch_size`).
        mask_ratio: fraction of squares to mask, in (0, 1).
        seed: if given, masks come from a private `torch.Generator` seeded with it (reproducible evaluation
            masks); otherwise from torch's global RNG, which `Trainer`/`set_seed` and every DataLoader worker seed.
    """

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6, seed=None):
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
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must lie strictly between 0 and 1.")
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(math.ceil(self.token_count * mask_ratio))
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @classmethod
    def from_config(cls, config, seed=None):
        return cls(config.image_size, config.mask_patch_size, config.patch_size, config.mask_ratio, seed=seed)

    @property
    def grid_size(self):
        return self.rand_size * self.scale

    def __call__(self, rng=None, generator=None):
        """One mask, a `(grid, grid)` bool numpy array.

        `rng` may be a `numpy.random.RandomState`/`Generator` (e.g. to replay the official code's numpy draws);
        `generator` a `torch.Generator`; by default the mask generator's own RNG is used.
        """
        if rng is not None:
            chosen = np.asarray(rng.permutation(self.token_count)[: self.mask_count])
        else:
            generator = generator if generator is not None else self.generator
            chosen = torch.randperm(self.token_count, generator=generator)[: self.mask_count].numpy()
        mask = np.zeros(self.token_count, dtype=bool)
        mask[chosen] = True
        mask = mask.reshape(self.rand_size, self.rand_size)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def __repr__(self):
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}: {self.mask_count} of "
            f"{self.token_count} squares)"
        )
