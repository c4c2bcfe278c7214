"""The fine-tuning augmentation: RandAugment ops against hand-computed pixels, the policy's sampling, random
erasing's rectangle, and how the processor, the transform and the runs use them."""

import random

import numpy as np
import pytest
from PIL import Image

from hf_simmim import SimMIMConfig, SimMIMImageProcessor
from hf_simmim.data import augmentation, finetuning_augmentation
from hf_simmim.data.augmentation import OPS, RandAugment, parse_rand_augment, random_erasing
from hf_simmim.data.transforms import SimMIMTransform

BICUBIC = Image.BICUBIC


class FixedRandom(random.Random):
    """A `random.Random` whose `random()` returns fixed values in turn (to choose signs and skips)."""

    def __init__(self, values, seed=0):
        super().__init__(seed)
        self.values = list(values)

    def random(self):
        return self.values.pop(0) if self.values else super().random()


def gradient_image(width=40, height=30):
    x = np.tile(np.linspace(0, 255, width), (height, 1))
    return Image.fromarray(np.stack([x, x[::-1, ::-1], np.full_like(x, 100)], axis=-1).astype(np.uint8))


def pixels(image):
    return np.asarray(image, dtype=int)


def test_parse_rand_augment_reads_timm_notation():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == {"magnitude": 9.0, "magnitude_std": 0.5, "num_ops": 2, "prob": 0.5}
    assert parse_rand_augment("rand-m7-n3-p1.0-mstdinf") == {
        "magnitude": 7.0, "magnitude_std": float("inf"), "num_ops": 3, "prob": 1.0}
    for spec, message in [("augmix-m5", "must start with 'rand-'"), ("rand-m9-inc0", "increasing"),
                          ("rand-x3", "cannot read 'x3'"), ("rand-p2", "p must lie in")]:
        with pytest.raises(ValueError, match=message):
            parse_rand_augment(spec)


def test_colour_ops_match_hand_computed_pixels():
    image = gradient_image()
    array = pixels(image)
    rng = FixedRandom([0.9])  # >= 0.5: the sign stays positive
    np.testing.assert_array_equal(pixels(OPS["Invert"](image, 9, rng, BICUBIC)), 255 - array)
    # magnitude 9: solarize above 256 - int(0.9 * 256) = 26; posterize to 4 - int(3.6) = 1 bit; add int(99) below 128
    np.testing.assert_array_equal(
        pixels(OPS["SolarizeIncreasing"](image, 9, rng, BICUBIC)), np.where(array >= 26, 255 - array, array)
    )
    np.testing.assert_array_equal(pixels(OPS["PosterizeIncreasing"](image, 9, rng, BICUBIC)), array & 0b10000000)
    # magnitude 10: 0 bits, `v & ~(2 ** 8 - 1)` = 0 (timm's result; Pillow itself now refuses bits=0)
    assert not pixels(OPS["PosterizeIncreasing"](image, 10, rng, BICUBIC)).any()
    np.testing.assert_array_equal(
        pixels(OPS["SolarizeAdd"](image, 9, rng, BICUBIC)), np.where(array < 128, np.minimum(array + 99, 255), array)
    )
    # brightness: factor 1 + 0.9 * m / 10 (positive sign) or 1 - 0.9 * m / 10 (negative) on a constant image
    grey = Image.new("RGB", (4, 4), (100, 50, 20))
    brighter = pixels(OPS["BrightnessIncreasing"](grey, 5, FixedRandom([0.9]), BICUBIC))[0, 0]
    darker = pixels(OPS["BrightnessIncreasing"](grey, 5, FixedRandom([0.1]), BICUBIC))[0, 0]
    np.testing.assert_allclose(brighter, np.minimum(np.round(np.array([100, 50, 20]) * 1.45), 255), atol=1)
    np.testing.assert_allclose(darker, np.round(np.array([100, 50, 20]) * 0.55), atol=1)


def test_geometric_ops_move_pixels_and_fill_with_the_mean_colour():
    image = Image.new("RGB", (40, 20), (255, 255, 255))
    # translate right by 0.45 * 40 * m / 10 = 18 px at m=10 (sign negative -> shift the content right)
    moved = pixels(OPS["TranslateXRel"](image, 10, FixedRandom([0.1]), BICUBIC))
    assert (moved[:, :18] == augmentation.FILL).all() and (moved[:, 19:] == 255).all()
    moved = pixels(OPS["TranslateXRel"](image, 10, FixedRandom([0.9]), BICUBIC))
    assert (moved[:, :21] == 255).all() and (moved[:, 23:] == augmentation.FILL).all()
    # rotation by m / 10 * 30 degrees: the corners fill with the mean colour, the centre stays
    rotated = pixels(OPS["Rotate"](Image.new("RGB", (41, 41), (255, 255, 255)), 10, FixedRandom([0.9]), BICUBIC))
    assert (rotated[0, 0] == augmentation.FILL).all() and (rotated[20, 20] == 255).all()
    sheared = pixels(OPS["ShearX"](image, 10, FixedRandom([0.9]), BICUBIC))  # x' = x + 0.3 y: the bottom-right empties
    assert (sheared[19, 39] == augmentation.FILL).all() and (sheared[0, 0] == 255).all()


def test_policy_draws_ops_uniformly_and_skips_each_with_probability_half(monkeypatch):
    calls = []

    def recorder(name):
        return lambda image, m, rng, resample: calls.append((name, m)) or image

    monkeypatch.setattr(augmentation, "OPS", {name: recorder(name) for name in OPS})
    policy = RandAugment("rand-m9-mstd0.5-inc1")
    rng = random.Random(0)
    for _ in range(4000):
        policy(Image.new("RGB", (4, 4)), rng)
    assert abs(len(calls) / 8000 - 0.5) < 0.02  # 2 ops per image, each applied with p = 0.5
    counts = np.array([sum(name == n for n, _ in calls) for name in OPS])
    assert counts.min() > 0.7 * len(calls) / 15 and counts.max() < 1.3 * len(calls) / 15
    magnitudes = np.array([m for _, m in calls])
    assert abs(magnitudes.mean() - 9.0) < 0.05 and abs(magnitudes.std() - 0.5) < 0.05 and magnitudes.max() <= 10.0
    calls.clear()
    RandAugment("rand-m12-mstd0-n1-p1")(Image.new("RGB", (4, 4)), rng)
    assert len(calls) == 1 and calls[0][1] == 10.0  # one op, always applied, magnitude clipped to 10


def test_random_erasing_replaces_one_rectangle_with_noise():
    rng = random.Random(3)
    for _ in range(50):
        array = np.full((3, 64, 48), 7.0, dtype=np.float32)
        random_erasing(array, prob=1.0, rng=rng)
        rows, cols = np.nonzero((array != 7.0).any(axis=0))
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == h * w  # one filled rectangle
        assert 0.02 * 64 * 48 * 0.8 <= h * w <= 64 * 48 / 3 * 1.2 and 0.25 <= h / w <= 4.0
    array = np.full((3, 256, 256), 7.0, dtype=np.float32)
    random_erasing(array, prob=1.0, rng=random.Random(0), min_area=0.3, max_area=0.33)
    noise = array[array != 7.0]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02
    untouched = np.zeros((3, 8, 8), dtype=np.float32)
    assert not random_erasing(untouched, prob=0.0, rng=rng).any()


def test_transform_applies_them_when_training_only(tmp_path):
    config = SimMIMConfig.from_preset("vit-tiny-test")
    image = gradient_image(48, 40)
    processor = SimMIMImageProcessor.from_model_config(config)
    plain = finetuning_augmentation(32, rand_augment=None, random_erasing=0.0)
    augmented = finetuning_augmentation(32, rand_augment="rand-m9-mstd0.5-n2-p1", random_erasing=1.0)

    def run(augmentation, train, seed=0):
        transform = SimMIMTransform(
            processor, train=train, with_mask=False, rng=random.Random(seed), augmentation=augmentation
        )
        return transform({"image": [image]})["pixel_values"][0]

    assert not np.array_equal(run(plain, True), run(augmented, True))
    np.testing.assert_array_equal(run(plain, False), run(augmented, False))  # evaluation: untouched
    np.testing.assert_array_equal(run(augmented, True, seed=5), run(augmented, True, seed=5))  # seeded
    with pytest.raises(ValueError, match="random_erasing=1.5"):
        finetuning_augmentation(32, random_erasing=1.5)
    with pytest.raises(ValueError, match="rand_augment='rand-q1'"):
        finetuning_augmentation(32, rand_augment="rand-q1")


def test_the_padded_crop_of_a_larger_image_is_a_window_of_its_evaluation_view():
    """At 32 px the fine-tuning crop is timm's RandomCrop(32, padding=4), made for 32-px images. A 400x300 image is
    first brought to 32 px as evaluation does (shorter side to 32, centre square), so every training crop is a 32-px
    window of that view with a 4-px black border around it, not a raw 32-px window of the photo."""
    photo = gradient_image(400, 300)
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"), crop_pct=1.0)
    evaluation = SimMIMTransform(processor, train=False, with_mask=False, uint8=True)
    view = evaluation.image_to_array(photo).transpose(1, 2, 0)
    assert view.shape == (32, 32, 3)
    padded = np.pad(view, ((4, 4), (4, 4), (0, 0)))  # 40 x 40, the view in the middle
    crop = finetuning_augmentation(32, rand_augment=None, random_erasing=0.0)
    crop = augmentation.AugmentationPreset(**{**crop.to_dict(), "hflip_prob": 0.0})
    offsets = set()
    for seed in range(40):
        out = np.asarray(crop.augment(photo, random.Random(seed)))
        windows = [(top, left) for top in range(9) for left in range(9)
                   if np.array_equal(padded[top : top + 32, left : left + 32], out)]
        assert windows, f"seed {seed}: the crop is no window of the padded evaluation view"
        offsets.add(windows[0])
    assert len(offsets) > 20  # the window moves: 81 places, 40 draws
