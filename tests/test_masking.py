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


# ---------------------------------------------------------------------------------------------- mask strategies
# 32 px images, 4 px patches, 8 px squares: an 8 x 8 patch grid, a 4 x 4 grid of squares.
SMALL = dict(input_size=32, mask_patch_size=8, model_patch_size=4)
STOCHASTIC = ("random_block", "random_patch", "grid", "block_wise")


def strategy_generator(mask_strategy, seed=None, **overrides):
    ratio = 0.5 if mask_strategy == "grid" else 0.6
    return SimMIMMaskGenerator(**{**SMALL, "mask_ratio": ratio, **overrides}, mask_strategy=mask_strategy, seed=seed)


@pytest.mark.parametrize(
    "mask_strategy, expected",
    [
        ("random_block", 40),  # ceil(0.6 * 16) = 10 squares of 2 x 2 patches
        ("random_patch", 39),  # ceil(0.6 * 64)
        ("grid", 32),  # 8 of the 16 squares
        ("center", 39),
    ],
)
def test_strategies_with_a_fixed_count_mask_exactly_that_many_patches(mask_strategy, expected):
    generator = strategy_generator(mask_strategy, seed=0)
    for _ in range(20):
        mask = generator()
        assert mask.shape == (8, 8) and mask.dtype == np.bool_
        assert mask.sum() == expected


def test_block_wise_never_exceeds_the_target_and_comes_close_on_average():
    # BEiT's setting: a 14 x 14 grid; ceil(0.4 * 196) = 79 patches (BEiT masks 75).
    generator = SimMIMMaskGenerator(224, 32, 16, 0.4, mask_strategy="block_wise", seed=0)
    counts = np.array([generator().sum() for _ in range(300)])
    assert counts.max() <= 79
    assert counts.mean() > 0.97 * 79, counts.mean()
    small = strategy_generator("block_wise", seed=1)  # 39 of 64 patches
    counts = np.array([small().sum() for _ in range(300)])
    assert counts.max() <= 39 and counts.mean() > 0.95 * 39, counts.mean()


def masked_neighbour_share(masks):
    """Of the horizontal and vertical neighbour pairs with at least one masked patch, the share with both masked."""
    masks = np.asarray(masks)
    pairs = [(masks[:, :, 1:], masks[:, :, :-1]), (masks[:, 1:, :], masks[:, :-1, :])]
    both = sum((a & b).sum() for a, b in pairs)
    either = sum((a | b).sum() for a, b in pairs)
    return both / either


def test_block_wise_masks_are_made_of_blocks():
    """Random patches at 0.4 have a masked neighbour pair in both-masked state with probability
    0.4^2 / (1 - 0.6^2) = 0.25; rectangles of >= 16 patches keep most masked patches next to masked ones."""
    kwargs = dict(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.4, seed=0)
    blocks = [SimMIMMaskGenerator(**kwargs, mask_strategy="block_wise")() for _ in range(100)]
    scattered = [SimMIMMaskGenerator(**kwargs, mask_strategy="random_patch")() for _ in range(100)]
    assert abs(masked_neighbour_share(scattered) - 0.25) < 0.03
    assert masked_neighbour_share(blocks) > 0.6


CHECKERBOARD = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=bool)


def test_grid_masks_one_colour_of_a_checkerboard_of_squares():
    generator = strategy_generator("grid", seed=0)
    seen = set()
    for _ in range(20):
        squares = coarse(generator(), 2)
        assert np.array_equal(squares, CHECKERBOARD) or np.array_equal(squares, ~CHECKERBOARD), squares
        seen.add(bool(squares[0, 0]))
    assert seen == {True, False}  # both colours are drawn
    # 3 x 3 squares: 5 or 4 of the 9 are masked
    odd = SimMIMMaskGenerator(96, 32, 16, 0.5, mask_strategy="grid", seed=0)
    assert {int(coarse(odd(), 2).sum()) for _ in range(20)} == {4, 5}


@pytest.mark.parametrize(
    "setting, expected_rows",
    [
        # 16 of 64: a 4 x 4 box, 2 patches from each edge
        (dict(SMALL, mask_ratio=0.25), ["00000000", "00000000", "00111100", "00111100", "00111100", "00111100",
                                        "00000000", "00000000"]),
        # 39 of 64: 7 columns, 5 full rows and 4 patches centred in a sixth
        (dict(SMALL, mask_ratio=0.6), ["00000000", "11111110", "11111110", "11111110", "11111110", "11111110",
                                       "01111000", "00000000"]),
        # 8 of 16 (a 4 x 4 grid of 8 px patches): 3 columns, 2 full rows, 2 patches in a third
        (dict(input_size=32, mask_patch_size=8, model_patch_size=8, mask_ratio=0.5), ["1110", "1110", "1100",
                                                                                      "0000"]),
    ],
)
def test_center_masks_a_centred_box(setting, expected_rows):
    expected = np.array([[c == "1" for c in row] for row in expected_rows])
    for seed in (0, 1):  # no randomness: every seed, every draw
        generator = SimMIMMaskGenerator(**setting, mask_strategy="center", seed=seed)
        np.testing.assert_array_equal(generator(), expected)
        np.testing.assert_array_equal(generator(), expected)


@pytest.mark.parametrize("mask_strategy", STOCHASTIC)
def test_strategies_are_reproducible_from_their_seed(mask_strategy):
    generators = [strategy_generator(mask_strategy, seed=seed) for seed in (7, 7, 8)]
    first, second, other = (np.stack([generator() for _ in range(10)]) for generator in generators)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    generator = strategy_generator(mask_strategy)
    np.testing.assert_array_equal(
        generator(generator=torch.Generator().manual_seed(5)), generator(generator=torch.Generator().manual_seed(5))
    )
    torch.manual_seed(3)  # unseeded: torch's global RNG
    x = generator()
    torch.manual_seed(3)
    np.testing.assert_array_equal(generator(), x)


def test_numpy_replay_is_for_the_official_strategy_only():
    with pytest.raises(ValueError, match="rng replays.*mask_strategy='center'.*generator="):
        strategy_generator("center")(rng=np.random.default_rng(0))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mask_strategy="stripes"), r"mask_strategy='stripes' is not supported: use one of \('random_block'"),
        (dict(mask_strategy="grid", mask_ratio=0.6), r"mask_ratio=0.6 with mask_strategy='grid'.*mask_ratio=0.5"),
        (dict(mask_strategy="center", mask_ratio=1.0), r"mask_ratio=1.0 must lie strictly between 0 and 1"),
    ],
)
def test_config_refuses_a_strategy_it_cannot_draw(fields, message):
    with pytest.raises(ValueError, match=message):
        SimMIMConfig.from_preset("vit-tiny-test", **fields)
    with pytest.raises(ValueError, match=message):
        SimMIMMaskGenerator(**SMALL, **{"mask_ratio": 0.6, **fields})


def test_the_strategy_travels_from_config_to_processor_and_masks(tmp_path):
    from hf_simmim import SimMIMImageProcessor, mask_generator_for

    config = SimMIMConfig.from_preset("vit-tiny-test", mask_strategy="center", mask_ratio=0.25)
    assert config.to_dict()["mask_strategy"] == "center"
    assert SimMIMConfig.from_dict(config.to_dict()).mask_strategy == "center"
    legacy = {k: v for k, v in config.to_dict().items() if k != "mask_strategy"}
    assert SimMIMConfig.from_dict(legacy).mask_strategy == "random_block"  # checkpoints saved before strategies

    processor = SimMIMImageProcessor.from_model_config(config)
    processor.save_pretrained(tmp_path)
    processor = SimMIMImageProcessor.from_pretrained(tmp_path)
    box = np.zeros((8, 8), dtype=bool)
    box[2:6, 2:6] = True  # 16 of 64 patches, centred
    batch = processor([np.zeros((32, 32, 3), np.uint8)] * 2, return_bool_masked_pos=True)
    for mask in batch["bool_masked_pos"]:
        np.testing.assert_array_equal(mask, box)
    np.testing.assert_array_equal(processor.mask_generator(seed=0)(), box)
    np.testing.assert_array_equal(mask_generator_for(config)(), box)
    fields = dict(image_size=32, patch_size=4, mask_patch_size=8, mask_ratio=0.6)
    assert mask_generator_for(fields).mask_strategy == "random_block"
    assert mask_generator_for(dict(fields, mask_strategy="random_patch"))().sum() == 39


def test_the_reconstruction_picture_names_the_strategy(tmp_path, monkeypatch):
    from PIL import Image

    from hf_simmim import SimMIMForMaskedImageModeling
    from hf_simmim.reporting import pictures

    config = SimMIMConfig.from_preset("vit-tiny-test", mask_strategy="grid", mask_ratio=0.5)
    SimMIMForMaskedImageModeling(config).save_pretrained(tmp_path / "model")
    Image.new("RGB", (32, 32), (10, 120, 200)).save(tmp_path / "image.png")
    titles = []
    drawn = pictures.reconstruction_grid
    monkeypatch.setattr(pictures, "reconstruction_grid", lambda *a, **k: titles.append(k["title"]) or drawn(*a, **k))
    pictures.reconstruct_images(str(tmp_path / "model"), [tmp_path / "image.png"], tmp_path / "grid.png")
    assert titles == ["model, grid masks"]


@pytest.mark.parametrize(
    "mask_strategy, ratio, row",
    [
        ("random_block", "0.6", "random_block: 0.6 of the 8 x 8 px squares (10 of 16)"),
        ("random_patch", "0.6", "random_patch: 0.6 of the 4 x 4 px patches, chosen at random (39 of 64)"),
        ("grid", "0.5", "grid: a checkerboard of the 8 x 8 px squares"),
        ("block_wise", "0.6", "block_wise: BEiT's rectangles of 4 x 4 px patches up to 0.6 of them (39 of 64 at most)"),
        ("center", "0.6", "center: a centred box of 0.6 of the 4 x 4 px patches (39 of 64)"),
    ],
)
def test_run_mim_trains_with_each_strategy(mask_strategy, ratio, row, tmp_path):
    from conftest import load_script

    run_mim = load_script("examples/run_mim.py")
    out = tmp_path / "run"
    argv = ["--mask_strategy", mask_strategy, "--mask_ratio", ratio, "--max_steps", "2"]
    argv += ["--per_device_train_batch_size", "8", "--num_reconstruction_images", "0", "--eval_strategy", "no"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--output_dir", str(out)]
    assert run_mim.main(argv) == 0
    assert SimMIMConfig.from_pretrained(out).mask_strategy == mask_strategy
    assert f"| Masking | {row}" in (out / "README.md").read_text()
