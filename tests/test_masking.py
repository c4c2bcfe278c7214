"""The mask generator against the official algorithm (microsoft/SimMIM `data/data_simmim.py`, `MaskGenerator`)."""

import math

import numpy as np
import pytest
import torch

from hf_simmim import SimMIMConfig, SimMIMMaskGenerator


class OfficialMaskGenerator:
    """The official MaskGenerator, transcribed; `rng` replaces numpy's global RNG (`np.random`)."""

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        assert self.input_size % self.mask_patch_size == 0
        assert self.mask_patch_size % self.model_patch_size == 0
        self.rand_size = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))

    def __call__(self, rng):
        mask_idx = rng.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return mask


SETTINGS = [
    dict(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6),  # Swin-B
    dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6),  # ViT-B/16
    dict(input_size=32, mask_patch_size=8, model_patch_size=2, mask_ratio=0.6),
    dict(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.75),
    dict(input_size=96, mask_patch_size=32, model_patch_size=32, mask_ratio=0.3),
    dict(input_size=64, mask_patch_size=8, model_patch_size=4, mask_ratio=0.7),  # 0.7 * 64 = 44.8 -> 45
]


def coarse(mask, scale):
    """(g, g) mask -> (g/scale, g/scale) blocks; asserts each block is constant."""
    g = mask.shape[0]
    blocks = np.asarray(mask).reshape(g // scale, scale, g // scale, scale)
    assert (blocks == blocks[:, :1, :, :1]).all(), "a mask patch is not uniformly masked"
    return blocks[:, 0, :, 0]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_same_masks_as_the_official_algorithm(setting):
    ours = SimMIMMaskGenerator(**setting)
    official = OfficialMaskGenerator(**setting)
    assert (ours.rand_size, ours.scale, ours.token_count, ours.mask_count) == (
        official.rand_size,
        official.scale,
        official.token_count,
        official.mask_count,
    )
    rng_ours, rng_official = np.random.RandomState(123), np.random.RandomState(123)
    for _ in range(20):
        np.testing.assert_array_equal(ours(rng=rng_ours).astype(int), official(rng_official))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_draw_masks_exactly_ceil_ratio_squares(setting):
    generator = SimMIMMaskGenerator(**setting, seed=0)
    grid = setting["input_size"] // setting["model_patch_size"]
    expected = math.ceil(setting["mask_ratio"] * (setting["input_size"] // setting["mask_patch_size"]) ** 2)
    for _ in range(50):
        mask = generator()
        assert mask.shape == (grid, grid) and mask.dtype == np.bool_
        assert coarse(mask, setting["mask_patch_size"] // setting["model_patch_size"]).sum() == expected


@pytest.mark.parametrize(
    "preset, masked, squares, grid",
    [("vit-base-patch16-224", 30, 49, 14), ("swin-base-window6-192", 22, 36, 48)],
)
def test_paper_presets(preset, masked, squares, grid):
    """The reference doc: ViT-B/16 at 224 -> 30 of 49 squares, 14x14 mask; Swin-B at 192 -> 22 of 36, 48x48."""
    generator = SimMIMMaskGenerator.from_config(SimMIMConfig.from_preset(preset), seed=0)
    assert (generator.mask_count, generator.token_count, generator.grid_size) == (masked, squares, grid)
    mask = generator()
    assert mask.shape == (grid, grid)
    assert mask.sum() == masked * (grid // math.isqrt(squares)) ** 2


def test_every_square_is_masked_equally_often():
    generator = SimMIMMaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6, seed=0)
    draws = 3000
    counts = sum(coarse(generator(), 2).astype(int) for _ in range(draws))
    frequency = counts / draws
    expected = 10 / 16  # ceil(0.6 * 16) = 10 of 16 squares
    sigma = math.sqrt(expected * (1 - expected) / draws)
    assert np.abs(frequency - expected).max() < 5 * sigma, frequency
    # Pairs of squares too: no square is tied to another (each pair masked together with probability
    # C(14, 8) / C(16, 10) = 10 * 9 / (16 * 15)).
    generator = SimMIMMaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6, seed=1)
    flat = np.stack([coarse(generator(), 2).ravel() for _ in range(draws)]).astype(float)
    together = flat.T @ flat / draws
    off_diagonal = together[~np.eye(16, dtype=bool)]
    assert np.abs(off_diagonal - 90 / 240).max() < 0.06


def test_seeded_reproducibility():
    kwargs = dict(input_size=64, mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    a, b, c = (SimMIMMaskGenerator(**kwargs, seed=seed) for seed in (7, 7, 8))
    first, second, third = [np.stack([g() for _ in range(10)]) for g in (a, b, c)]
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, third)
    # Successive draws differ (a fresh mask every read).
    assert len({m.tobytes() for m in first}) > 5
    # Without a seed the global torch RNG is used, so torch.manual_seed makes it reproducible.
    unseeded = SimMIMMaskGenerator(**kwargs)
    torch.manual_seed(3)
    x = np.stack([unseeded() for _ in range(5)])
    torch.manual_seed(3)
    y = np.stack([unseeded() for _ in range(5)])
    np.testing.assert_array_equal(x, y)
    # An explicit torch.Generator or numpy RNG overrides the generator's own.
    np.testing.assert_array_equal(
        a(generator=torch.Generator().manual_seed(5)), a(generator=torch.Generator().manual_seed(5))
    )
    np.testing.assert_array_equal(a(rng=np.random.default_rng(4)), a(rng=np.random.default_rng(4)))


def test_masks_feed_the_model_directly():
    config = SimMIMConfig.from_preset("vit-tiny-test")
    generator = SimMIMMaskGenerator.from_config(config)
    assert generator.grid_size == config.grid_size
    assert (generator.input_size, generator.mask_patch_size, generator.model_patch_size, generator.mask_ratio) == (
        config.image_size,
        config.mask_patch_size,
        config.patch_size,
        config.mask_ratio,
    )
    assert "10 of 16" in repr(generator)
