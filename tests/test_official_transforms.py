"""Our augmentation presets and evaluation preprocessing against the objects the official code builds
(`official_recipe/transforms.json`: microsoft/SimMIM's `SimMIMTransform` and `build_transform` on timm 1.0.31 /
torchvision 0.28), at 224 px and at 32 px, then behaviours checked on pixels against hand-computed references
(torchvision's and timm's formulas applied by hand with the oracle's parameters)."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from hf_simmim import SimMIMImageProcessor
from hf_simmim.data.augmentation import FILL, finetuning_augmentation, pretraining_augmentation, random_erasing
from hf_simmim.models.image_transforms import to_normalized_array
from hf_simmim.training.finetuning import eval_crop_pct

SIZES = (224, 32)


@pytest.fixture(scope="module")
def oracle(official_recipe_dir):
    return json.loads((official_recipe_dir / "transforms.json").read_text())


def steps(transforms):
    """`{short class name: attributes}` of a list of recorded transforms."""
    return {step["class"].rsplit(".", 1)[1]: step.get("attributes", {}) for step in transforms}


def pil_filter(recorded):
    """A recorded interpolation ("InterpolationMode.BICUBIC ('bicubic')", "Resampling.BICUBIC (3)") -> PIL filter."""
    return Image.Resampling[re.search(r"\.([A-Z]+)", recorded).group(1)]


def finetune_train(oracle, size):
    return steps(oracle["finetune"][f"img{size}"]["train"]["transforms"])


class ScriptedRandom(random.Random):
    """A `random.Random` that answers `randrange`, `random`, `gauss` and `uniform` from scripts (then falls back to
    its seeded stream), and records the bounds `uniform` was asked for."""

    def __init__(self, randrange=(), random=(), gauss=(), uniform=()):
        super().__init__(0)
        self.scripts = {"randrange": list(randrange), "random": list(random), "gauss": list(gauss),
                        "uniform": list(uniform)}
        self.uniform_bounds = []

    def _next(self, name, fallback, *args):
        return self.scripts[name].pop(0) if self.scripts[name] else fallback(*args)

    def randrange(self, *args):
        return self._next("randrange", super().randrange, *args)

    def random(self):
        return self._next("random", super().random)

    def gauss(self, *args):
        return self._next("gauss", super().gauss, *args)

    def uniform(self, a, b):
        self.uniform_bounds.append((a, b))
        return self._next("uniform", super().uniform, a, b)


# ---------------------------------------------------------------------------------------------- pretraining
@pytest.mark.parametrize("size", [224, 192, 32])
def test_pretraining_preset_has_the_official_crop_flip_and_normalisation(oracle, size):
    for backbone, patch_size in (("swin", 4), ("vit", 16)):
        recorded = oracle["pretrain"][f"img{size}_{backbone}"]
        official = steps(recorded["transform_img"]["transforms"])
        preset = pretraining_augmentation(size)
        crop = official["RandomResizedCrop"]
        assert preset.crop == "random_resized" and crop["size"] == [size, size] and preset.image_size == size
        assert tuple(preset.crop_scale) == tuple(crop["scale"])
        assert preset.crop_ratio == pytest.approx(crop["ratio"], rel=1e-15)
        assert Image.Resampling[preset.resample.upper()] == pil_filter(crop["interpolation"])  # bilinear
        assert preset.hflip_prob == official["RandomHorizontalFlip"]["p"]
        assert preset.rand_augment is None and preset.random_erasing == 0.0  # nothing else in the official list
        assert set(official) == {"Lambda", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"}
        processor = SimMIMImageProcessor(image_size=size, patch_size=patch_size, mask_patch_size=32, mask_ratio=0.6)
        np.testing.assert_allclose(processor.image_mean, official["Normalize"]["mean"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(processor.image_std, official["Normalize"]["std"], rtol=0, atol=1e-7)
        # the mask generator built from the same settings (DATA.MASK_PATCH_SIZE 32, ratio 0.6)
        expected = recorded["mask_generator"]["attributes"]
        generator = processor.mask_generator(seed=0)
        for name in ("input_size", "mask_patch_size", "model_patch_size", "rand_size", "scale", "token_count",
                     "mask_count"):
            assert getattr(generator, name) == expected[name], name
        assert generator().sum() == expected["mask_count"] * expected["scale"] ** 2  # at 32 px: every token


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("size", SIZES)
def test_finetuning_preset_has_the_official_crop_and_flip(oracle, size):
    official = finetune_train(oracle, size)
    preset = finetuning_augmentation(size)
    assert preset.image_size == size and preset.hflip_prob == official["RandomHorizontalFlip"]["p"]
    if size > 32:
        crop = official["RandomResizedCropAndInterpolation"]
        assert preset.crop == "random_resized" and tuple(preset.crop_scale) == tuple(crop["scale"])
        assert preset.crop_ratio == pytest.approx(crop["ratio"], rel=1e-15)
        assert Image.Resampling[preset.resample.upper()] == pil_filter(crop["interpolation"])  # bicubic
    else:
        crop = official["RandomCrop"]
        assert crop["size"] == [size, size] and not crop["pad_if_needed"] and crop["padding_mode"] == "constant"
        assert preset.crop == "random_padded" and preset.crop_padding == crop["padding"]
        assert crop["fill"] == 0  # the black border of the padded crop, checked on pixels below
    # colour jitter is not in the official list (timm drops it when RandAugment is on), nor in ours
    assert list(official)[-4:] == ["RandAugment", "MaybeToTensor", "Normalize", "RandomErasing"]


@pytest.mark.parametrize("size", SIZES)
def test_rand_augment_has_the_official_ops_and_settings(oracle, size):
    official = finetune_train(oracle, size)["RandAugment"]
    policy = finetuning_augmentation(size).rand_augment_policy
    ops = [op["attributes"] for op in official["ops"]]
    assert policy.num_ops == official["num_layers"] and official["choice_weights"] is None  # uniform choice
    assert policy.names == [op["name"] for op in ops]  # the 15 "increasing" ops, in timm's order
    for op in ops:
        assert op["prob"] == policy.prob and op["magnitude"] == policy.magnitude
        assert op["magnitude_std"] == policy.magnitude_std and op["magnitude_max"] is None  # clipped to [0, 10]
        assert tuple(op["kwargs"]["fillcolor"]) == FILL
        assert policy.resample == pil_filter(op["kwargs"]["resample"])  # bicubic, not a random filter
        # translate_const (timm: int(0.45 x size)) is read only by the absolute TranslateX/Y, not in this op set:
        # TranslateXRel/YRel move by up to translate_pct (default 0.45, not overridden) of the side instead
        assert op["hparams"]["translate_const"] == {224: 100, 32: 14}[size] == int(0.45 * size)
        assert "translate_pct" not in op["hparams"]
    assert not {"TranslateX", "TranslateY"} & set(policy.names)


@pytest.mark.parametrize("size", SIZES)
def test_random_erasing_has_the_official_settings(oracle, size):
    official = finetune_train(oracle, size)["RandomErasing"]
    preset = finetuning_augmentation(size)
    assert preset.random_erasing == official["probability"]
    assert official["mode"] == "pixel" and official["per_pixel"] and (official["min_count"], official["max_count"]) == (1, 1)
    # the ranges our random erasing draws the area fraction and the log aspect ratio from
    rng = ScriptedRandom(random=[0.0])
    random_erasing(np.zeros((3, size, size), dtype=np.float32), preset.random_erasing, rng)
    area_bounds, aspect_bounds = rng.uniform_bounds[:2]
    assert area_bounds == pytest.approx((official["min_area"], official["max_area"]), rel=1e-15)
    assert aspect_bounds == pytest.approx(tuple(official["log_aspect_ratio"]), rel=1e-15)


def test_random_erasing_erases_one_box_of_per_pixel_noise_with_probability_p(oracle):
    p = finetune_train(oracle, 224)["RandomErasing"]["probability"]  # timm: erase unless random() > p
    assert not random_erasing(np.zeros((3, 64, 64), np.float32), p, ScriptedRandom(random=[p + 1e-6])).any()
    # area 0.25 x 4096 = 1024 px at aspect 1 (log 0): a 32 x 32 box (timm: h = w = round(sqrt(area)))
    array = random_erasing(np.zeros((3, 64, 64), np.float32), p, ScriptedRandom(random=[p - 1e-6], uniform=[0.25, 0.0]))
    rows, cols = np.nonzero(array.any(axis=0))
    assert (np.ptp(rows) + 1, np.ptp(cols) + 1, len(rows)) == (32, 32, 32 * 32)
    box = array[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert len(np.unique(box)) == box.size  # per-pixel noise, not one colour per box


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_resizes_to_256_of_224_then_centre_crops(oracle):
    official = steps(oracle["finetune"]["img224"]["eval"]["transforms"])
    assert official["Resize"]["size"] == int(224 / eval_crop_pct(224)) == 256
    assert official["CenterCrop"]["size"] == [224, 224]
    processor = SimMIMImageProcessor(image_size=224, crop_pct=eval_crop_pct(224))
    assert processor.resample == pil_filter(official["Resize"]["interpolation"])  # bicubic
    np.testing.assert_allclose(processor.image_mean, official["Normalize"]["mean"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(processor.image_std, official["Normalize"]["std"], rtol=0, atol=1e-12)
    # torchvision on a 301 x 442 image, by hand: Resize(256) -> (256, int(256 * 442 / 301) = int(375.9) = 375);
    # CenterCrop(224) -> left int(round(32 / 2)) = 16, top int(round(151 / 2)) = int(round(75.5)) = 76
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (442, 301, 3), dtype=np.uint8))
    expected = image.resize((256, 375), Image.BICUBIC).crop((16, 76, 240, 300))
    np.testing.assert_array_equal(processor(image)["pixel_values"][0], to_normalized_array(expected))


def test_evaluation_at_32_px_only_normalises(oracle):
    official = steps(oracle["finetune"]["img32"]["eval"]["transforms"])
    assert list(official) == ["ToTensor", "Normalize"] and not oracle["finetune"]["img32"]["resize_im (IMG_SIZE > 32)"]
    processor = SimMIMImageProcessor(image_size=32, crop_pct=eval_crop_pct(32))
    array = np.random.RandomState(1).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    mean, std = (np.asarray(official["Normalize"][k])[:, None, None] for k in ("mean", "std"))
    expected = (array.transpose(2, 0, 1) / 255.0 - mean) / std  # ToTensor then Normalize
    np.testing.assert_allclose(processor(Image.fromarray(array))["pixel_values"][0], expected, atol=2e-6)


def test_centre_crop_offsets_round_half_to_even_as_torchvision():
    """A 32 x 35 image at 32 px (crop_pct 1): no resize (the short side is already 32, the long one
    int(32 * 35 / 32) = 35), then torchvision's top offset int(round(3 / 2)) = 2, not 3 // 2 = 1."""
    array = np.random.RandomState(2).randint(0, 256, (35, 32, 3), dtype=np.uint8)
    out = SimMIMImageProcessor(image_size=32, resample=Image.NEAREST)(Image.fromarray(array))["pixel_values"][0]
    np.testing.assert_array_equal(out, to_normalized_array(Image.fromarray(array[2:34])))


# ---------------------------------------------------------------------------------------------- pixels
def test_random_crop_with_padding_4_on_a_known_image(oracle):
    """torchvision's RandomCrop(32, padding=4): zero-pad 4 px on every side (40 x 40), then the window at (top, left)
    with top, left uniform in 0..8; then the flip. Run through the fine-tuning preset the runs use. Reference:
    numpy's pad and a slice."""
    crop = finetune_train(oracle, 32)["RandomCrop"]
    preset = finetuning_augmentation(32, rand_augment=None, random_erasing=0.0)
    array = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3) % 251
    padded = np.pad(array, ((crop["padding"],) * 2, (crop["padding"],) * 2, (0, 0)), constant_values=crop["fill"])
    image = Image.fromarray(array.astype(np.uint8))
    seen = set()
    for seed in range(300):
        rng, replay = random.Random(seed), random.Random(seed)
        top, left = replay.randint(0, 8), replay.randint(0, 8)
        window = padded[top : top + 32, left : left + 32]
        expected = window[:, ::-1] if replay.random() < 0.5 else window
        np.testing.assert_array_equal(np.asarray(preset.augment(image, rng)), expected)
        seen.add((top, left))
    assert len(seen) == 81  # every window position is reached


@pytest.mark.parametrize("size", SIZES)
def test_rand_augment_geometric_ops_resample_bicubic_with_the_mean_fill(oracle, size):
    """The policy itself, scripted to choose one op at magnitude 9 with a positive sign, against PIL called by hand
    with the oracle's fill and filter: Rotate by 9 / 10 x 30 = 27 degrees, TranslateXRel by 9 / 10 x 0.45 x side."""
    op = finetune_train(oracle, size)["RandAugment"]["ops"][0]["attributes"]
    fill, resample = tuple(op["kwargs"]["fillcolor"]), pil_filter(op["kwargs"]["resample"])
    policy = finetuning_augmentation(size).rand_augment_policy
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (size, size, 3), dtype=np.uint8))
    cases = {
        "Rotate": image.rotate(9 / 10 * 30.0, resample=resample, fillcolor=fill),
        "TranslateXRel": image.transform(image.size, Image.AFFINE, (1, 0, 9 / 10 * 0.45 * size, 0, 1, 0),
                                         resample=resample, fillcolor=fill),
    }
    for name, expected in cases.items():
        # op choice, apply (random() <= p), no second op (random() > p), magnitude 9, positive sign (random() >= 0.5)
        rng = ScriptedRandom(randrange=[policy.names.index(name), 0], random=[0.0, 0.99, 0.9], gauss=[9.0])
        np.testing.assert_array_equal(np.asarray(policy(image, rng)), np.asarray(expected), err_msg=name)


def test_posterize_at_magnitude_10_gives_timms_black_image():
    """PosterizeIncreasing keeps 4 - int(m / 10 x 4) bits: 0 at m = 10 (drawn about once in 44 from N(9, 0.5)),
    i.e. `v & ~(2 ** 8 - 1)` = 0 for every pixel. Current Pillow refuses bits=0; the op must not raise."""
    policy = finetuning_augmentation(224).rand_augment_policy
    image = Image.fromarray(np.random.RandomState(4).randint(0, 256, (8, 8, 3), dtype=np.uint8))
    index = policy.names.index("PosterizeIncreasing")
    rng = ScriptedRandom(randrange=[index, 0], random=[0.0, 0.99], gauss=[10.7])  # clipped to 10
    assert not np.asarray(policy(image, rng)).any()
    rng = ScriptedRandom(randrange=[index, 0], random=[0.0, 0.99], gauss=[9.0])  # 4 - int(3.6) = 1 bit
    np.testing.assert_array_equal(np.asarray(policy(image, rng)), np.asarray(image) & 0b10000000)
