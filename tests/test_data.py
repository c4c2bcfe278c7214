"""From images to batches: RGB conversion of every PIL mode, the paper's RandomResizedCrop against torchvision's
algorithm, the datasets transform (fresh masks on read, fixed masks with map), corrupt images, the collator and
the image processor."""

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from hf_simmim.data import AugmentationPreset, finetuning_augmentation
from hf_simmim import SimMIMConfig, SimMIMImageProcessor
from hf_simmim.data import checks
from hf_simmim.data.checks import check_image_dataset
from hf_simmim.data.transforms import SeededImageDataset, SimMIMTransform, collate_fn
from hf_simmim.data.image_ops import normalize_pixel_batch
from hf_simmim.models.image_transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resize_center_crop, to_normalized_array, to_rgb
from hf_simmim.data.image_ops import random_resized_crop_box, reduce_on_decode, resized_crop


def rgb_array(image):
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    array = np.asarray(converted)
    assert array.dtype == np.uint8 and array.shape == (image.height, image.width, 3)
    return array.astype(int)


# ---------------------------------------------------------------------------------------------- to_rgb
def test_to_rgb_grayscale_and_bilevel():
    gray = Image.fromarray(np.array([[0, 100, 255]], dtype=np.uint8), mode="L")
    np.testing.assert_array_equal(rgb_array(gray)[0], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    np.testing.assert_array_equal(rgb_array(bilevel)[0], [[0, 0, 0], [255, 255, 255]])


def test_to_rgb_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128)])
    out = rgb_array(rgba)[0]
    np.testing.assert_array_equal(out[0], [255, 0, 0])  # opaque: unchanged
    np.testing.assert_array_equal(out[1], [255, 255, 255])  # transparent: the white background
    np.testing.assert_allclose(out[2], [127, 127, 255], atol=1)  # half: blended
    la = Image.new("LA", (2, 1))
    la.putdata([(100, 255), (100, 0)])
    np.testing.assert_array_equal(rgb_array(la)[0], [[100, 100, 100], [255, 255, 255]])


@pytest.mark.parametrize("transparent", [False, True])
def test_to_rgb_palette(transparent):
    palette = [0, 0, 0, 200, 30, 40, 10, 220, 90] + [0] * (256 * 3 - 9)
    image = Image.new("P", (3, 1))
    image.putpalette(palette)
    image.putdata([0, 1, 2])
    if transparent:
        image.info["transparency"] = 1
    out = rgb_array(image)[0]
    np.testing.assert_array_equal(out[0], [0, 0, 0])
    np.testing.assert_array_equal(out[1], [255, 255, 255] if transparent else [200, 30, 40])
    np.testing.assert_array_equal(out[2], [10, 220, 90])


def test_to_rgb_cmyk():
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)])
    np.testing.assert_array_equal(rgb_array(image)[0], [[255, 255, 255], [255, 0, 0], [0, 0, 0]])


def test_to_rgb_16_bit_scales_the_full_range():
    image = Image.fromarray(np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    np.testing.assert_array_equal(rgb_array(image)[0, :, 0], [0, 100, 128, 255])
    # A 16-bit PNG read back from disk is the same mode, so the same scaling applies.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reread = Image.open(buffer)
    assert reread.mode == "I;16"
    np.testing.assert_array_equal(rgb_array(reread)[0, :, 0], [0, 100, 128, 255])


def test_to_rgb_float_and_32_bit_integer():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(rgb_array(unit)[0, :, 0], [0, 128, 255])
    wide = Image.fromarray(np.array([[0, 500, 1000]], dtype=np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(rgb_array(wide)[0, :, 0], [0, 128, 255])


def test_to_rgb_numpy_and_errors():
    array = np.random.RandomState(0).randint(0, 256, (4, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(array)), array)
    with pytest.raises(TypeError):
        to_rgb("not an image")


# ---------------------------------------------------------------------------------------------- crops
def torchvision_crop_box(width, height, scale, ratio, rng):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed, drawing from `rng` (uniform for the
    area and log-aspect, then top and left: torch.randint(0, n + 1) == random.randint(0, n))."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return j, i, j + w, i + h
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return j, i, j + w, i + h


@pytest.mark.parametrize("size", [(200, 150), (32, 32), (64, 200), (400, 40), (40, 400)])
def test_random_resized_crop_box_follows_torchvision(size):
    width, height = size
    scale, ratio = (0.67, 1.0), (3 / 4, 4 / 3)
    ours_rng, reference_rng = random.Random(0), random.Random(0)
    for _ in range(300):
        assert random_resized_crop_box(width, height, scale, ratio, ours_rng) == torchvision_crop_box(
            width, height, scale, ratio, reference_rng
        )


def test_random_resized_crop_box_statistics():
    width, height = 300, 280
    rng = random.Random(1)
    boxes = np.array([random_resized_crop_box(width, height, rng=rng) for _ in range(3000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    area_fraction = w * h / (width * height)
    # Rounding w and h to pixels moves the area by at most ~(1/w + 1/h).
    assert area_fraction.min() >= 0.67 - 0.02 and area_fraction.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.75 * (1 - 0.02) and aspect.max() <= 4 / 3 * (1 + 0.02)
    # Both ends of the ranges are reached, and positions spread over the image.
    assert area_fraction.min() < 0.7 and area_fraction.max() > 0.9
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    assert len(set(boxes[:, 0])) > 20 and len(set(boxes[:, 1])) > 10


def test_random_resized_crop_box_falls_back_to_a_centre_crop():
    assert random_resized_crop_box(400, 40, rng=random.Random(0)) == (173, 0, 226, 40)
    assert random_resized_crop_box(40, 400, rng=random.Random(0)) == (0, 173, 40, 226)


def test_resize_center_crop_drops_the_border():
    """crop_pct 0.875 at 32 px: the shorter side goes to 36, then the central 32x32 is kept."""
    array = np.zeros((36, 48, 3), dtype=np.uint8)
    array[:] = (255, 0, 0)
    array[2:34, 8:40] = (0, 0, 255)
    out = np.asarray(resize_center_crop(Image.fromarray(array), 32, crop_pct=0.875))
    assert out.shape == (32, 32, 3)
    assert (out == (0, 0, 255)).all()


def test_to_normalized_array_is_the_textbook_formula():
    array = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    out = to_normalized_array(Image.fromarray(array), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = ((array / 255.0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)).transpose(2, 0, 1)
    assert out.dtype == np.float32 and out.shape == (3, 5, 7) and out.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


def test_normalize_pixel_batch_is_the_textbook_formula_for_per_channel_and_scalar_statistics():
    """A processor may hold one mean and std for all channels (a scalar), as transformers' processors allow."""
    batch = torch.from_numpy(np.random.RandomState(1).randint(0, 256, (2, 3, 4, 5), dtype=np.uint8))
    for mean, std in ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), (0.5, 0.25)):
        expected = (batch.double() / 255.0 - torch.tensor(mean).reshape(-1, 1, 1)) / torch.tensor(std).reshape(-1, 1, 1)
        torch.testing.assert_close(normalize_pixel_batch(batch, mean, std).double(), expected, rtol=0, atol=2e-6)


def smooth_photo(width, height):
    """A smooth RGB image (gradients and a disc), so a decode at reduced scale is close to a full one."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    disc = ((x - width / 3) ** 2 + (y - height / 2) ** 2 < (height / 4) ** 2) * 80
    array = np.stack([255 * x / width, 255 * y / height, 128 + disc - 40], axis=-1)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def jpeg_file(image, quality=95):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_reduce_on_decode_keeps_the_crop_at_least_the_output_size():
    data = jpeg_file(smooth_photo(1200, 900))
    box = (100, 50, 1000, 650)  # 900 x 600: may shrink by up to 600 / 64 -> libjpeg's 1/8
    image, reduced_box = reduce_on_decode(Image.open(io.BytesIO(data)), box, 64)
    assert image.size == (150, 113)  # decoded at 1/8 scale (ceil(900 / 8) rows)
    np.testing.assert_allclose(reduced_box, (12.5, 6.25, 125.0, 81.25))
    assert min(reduced_box[2] - reduced_box[0], reduced_box[3] - reduced_box[1]) >= 64
    image, reduced_box = reduce_on_decode(Image.open(io.BytesIO(data)), box, 224)  # 600 / 224: at most 1/2
    assert image.size == (600, 450) and reduced_box == (50.0, 25.0, 500.0, 325.0)
    # A crop under twice the output size, a decoded JPEG, and a PNG are left alone.
    for source, small_box in ((Image.open(io.BytesIO(data)), (0, 0, 400, 400)), (Image.open(io.BytesIO(data)), box)):
        if small_box == box:
            source.load()
        image, same = reduce_on_decode(source, small_box, 224)
        assert image.size == (1200, 900) and same == small_box
    png = Image.open(io.BytesIO(png_bytes(np.asarray(smooth_photo(1200, 900)))))
    assert reduce_on_decode(png, box, 64) == (png, box)


def test_resized_crop_from_a_reduced_jpeg_matches_a_full_decode():
    data = jpeg_file(smooth_photo(1600, 1200))
    box = random_resized_crop_box(1600, 1200, rng=random.Random(3))
    lazy = resized_crop(Image.open(io.BytesIO(data)), box, 96)
    full_image = Image.open(io.BytesIO(data))
    full_image.load()  # decoded in full: no reduction
    full = resized_crop(full_image, box, 96)
    assert lazy.size == full.size == (96, 96) and lazy.mode == "RGB"
    difference = np.abs(np.asarray(lazy, dtype=int) - np.asarray(full, dtype=int))
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 8


def test_training_crop_uses_the_processors_resampling_filter():
    """Pretraining crops bilinearly (torchvision's default, used by the official pretraining); a processor set to
    bicubic (fine-tuning) crops bicubically; evaluation resizes with `resample`."""
    rng = np.random.RandomState(1)
    image = Image.fromarray(rng.randint(0, 256, (50, 60, 3), dtype=np.uint8))
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    assert processor.resample == Image.BICUBIC

    def transformed(augmentation=None):
        transform = SimMIMTransform(processor, train=True, with_mask=False, rng=random.Random(5), augmentation=augmentation)
        return transform({"image": [image]})["pixel_values"][0]

    rng_check = random.Random(5)
    box = random_resized_crop_box(60, 50, rng=rng_check)
    flipped = rng_check.random() < 0.5  # the transform draws the crop, then the flip, from its rng

    def expected(resample):
        crop = image.resize((32, 32), resample, box=box)
        return to_normalized_array(crop.transpose(Image.FLIP_LEFT_RIGHT) if flipped else crop)

    np.testing.assert_array_equal(transformed(), expected(Image.BILINEAR))
    bicubic = AugmentationPreset("bicubic-crop", 32, resample="bicubic")
    np.testing.assert_array_equal(transformed(bicubic), expected(Image.BICUBIC))
    assert not np.array_equal(expected(Image.BICUBIC), expected(Image.BILINEAR))
    nearest = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"), resample=0)
    np.testing.assert_array_equal(
        nearest(image)["pixel_values"][0],
        to_normalized_array(resize_center_crop(image, 32, resample=Image.NEAREST)),
    )
    with pytest.raises(ValueError, match="resample='lanczos' is not supported"):
        AugmentationPreset("lanczos-crop", 32, resample="lanczos")
    with pytest.raises(ValueError, match="resample='cubic'"):
        SimMIMImageProcessor(resample="cubic")


# ---------------------------------------------------------------------------------------------- processor
def test_image_processor_normalises_a_constant_image_exactly():
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    colour = (10, 200, 77)
    image = Image.new("RGB", (50, 40), colour)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.dtype == torch.float32
    expected = (np.array(colour) / 255 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    for channel in range(3):
        torch.testing.assert_close(
            pixel_values[0, channel], torch.full((32, 32), expected[channel], dtype=torch.float32), rtol=0, atol=1e-6
        )
    # Grayscale input comes out as three equal channels; a batch of two gives two rows.
    grays = [Image.new("L", (40, 40), 128), Image.new("L", (33, 60), 128)]
    gray = processor(grays, return_tensors="pt")["pixel_values"]
    assert gray.shape == (2, 3, 32, 32)
    expected_gray = (128 / 255 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(gray.mean(dim=(0, 2, 3)), torch.tensor(expected_gray, dtype=torch.float32))


def test_image_processor_masks():
    config = SimMIMConfig.from_preset("vit-tiny-test")
    processor = SimMIMImageProcessor.from_model_config(config)
    image = Image.new("RGB", (32, 32), (1, 2, 3))
    out = processor([image] * 3, return_bool_masked_pos=True, mask_seed=0, return_tensors="pt")
    assert out["bool_masked_pos"].shape == (3, 8, 8) and out["bool_masked_pos"].dtype == torch.bool
    assert (out["bool_masked_pos"].sum(dim=(1, 2)) == 10 * 4).all()  # ceil(0.6 * 16) squares of 2x2 patches
    again = processor([image] * 3, return_bool_masked_pos=True, mask_seed=0, return_tensors="pt")
    assert torch.equal(out["bool_masked_pos"], again["bool_masked_pos"])
    with pytest.raises(ValueError, match="crop_pct"):
        SimMIMImageProcessor(crop_pct=1.5)
    with pytest.raises(ValueError, match="empty"):
        processor([])


# ---------------------------------------------------------------------------------------------- datasets
def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def image_dataset(n=8, decode=True, extra_cells=()):
    import datasets

    rng = np.random.RandomState(0)
    cells = [{"bytes": png_bytes(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)), "path": None} for _ in range(n)]
    cells += list(extra_cells)
    return datasets.Dataset.from_dict(
        {"image": cells, "label": list(range(len(cells)))},
        features=datasets.Features({"image": datasets.Image(decode=decode), "label": datasets.Value("int64")}),
    )


@pytest.fixture(scope="module")
def processor():
    return SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))


def test_set_transform_draws_a_fresh_mask_and_crop_every_read(processor):
    dataset = image_dataset(4)
    dataset.set_transform(SimMIMTransform(processor, train=True))
    torch.manual_seed(0)
    random.seed(0)
    reads = [dataset[1] for _ in range(6)]
    for row in reads:
        assert np.asarray(row["pixel_values"]).shape == (3, 32, 32)
        assert np.asarray(row["bool_masked_pos"]).shape == (8, 8)
        assert row["label"] == 1
    assert len({np.asarray(r["bool_masked_pos"]).tobytes() for r in reads}) > 3
    assert len({np.asarray(r["pixel_values"]).tobytes() for r in reads}) > 3
    batch = collate_fn([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["bool_masked_pos"].shape == (4, 8, 8) and batch["bool_masked_pos"].dtype == torch.bool
    assert batch["labels"].tolist() == [0, 1, 2, 3]


def test_map_with_mask_seed_gives_fixed_masks_independent_of_batch_size(processor):
    dataset = image_dataset(7)

    def masks(batch_size, seed=0):
        mapped = dataset.map(
            SimMIMTransform(processor, train=False, mask_seed=seed),
            batched=True,
            with_indices=True,
            batch_size=batch_size,
            remove_columns=["image"],
            load_from_cache_file=False,
        )
        return np.array(mapped["bool_masked_pos"], dtype=bool), np.array(mapped["pixel_values"], dtype=np.float32)

    reference, pixels = masks(1)
    assert reference.shape == (7, 8, 8) and pixels.shape == (7, 3, 32, 32)
    for batch_size in (2, 3, 1000):
        again, again_pixels = masks(batch_size)
        np.testing.assert_array_equal(again, reference)
        np.testing.assert_array_equal(again_pixels, pixels)
    assert len({m.tobytes() for m in reference}) > 3  # rows get different masks
    assert not np.array_equal(masks(2, seed=1)[0], reference)
    # Evaluation preprocessing: a 36x40 image is resized so its short side is 32, then centre-cropped.
    expected = processor(dataset[0]["image"])["pixel_values"][0]
    np.testing.assert_allclose(pixels[0], expected, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_uint8_rows_normalise_to_the_float_rows(processor, train):
    dataset = image_dataset(6)

    def batch(uint8):
        transform = SimMIMTransform(processor, train=train, uint8=uint8, rng=random.Random(2), mask_seed=0)
        rows = [dict(zip(("pixel_values", "bool_masked_pos", "label"), values)) for values in zip(
            *transform({"image": dataset["image"], "label": dataset["label"]}, indices=list(range(6))).values())]
        return collate_fn(rows)

    small, full = batch(True), batch(False)
    assert small["pixel_values"].dtype == torch.uint8 and small["pixel_values"].shape == (6, 3, 32, 32)
    normalised = normalize_pixel_batch(small["pixel_values"], processor.image_mean, processor.image_std)
    torch.testing.assert_close(normalised, full["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(small["bool_masked_pos"], full["bool_masked_pos"]) and small["labels"].tolist() == list(range(6))
    assert normalize_pixel_batch(full["pixel_values"], processor.image_mean, processor.image_std) is full["pixel_values"]
    processor = SimMIMImageProcessor.from_model_config(SimMIMConfig.from_preset("vit-tiny-test"))
    with pytest.raises(ValueError, match="random erasing"):
        SimMIMTransform(processor, train=True, uint8=True, augmentation=finetuning_augmentation(32))


def corrupt_cells(tmp_path):
    """Images that cannot be decoded, each for its own reason: not an image, a truncated PNG, a truncated JPEG
    (large enough for the reduced-scale decode of the training crop), a missing file, an empty cell."""
    good = png_bytes(np.zeros((32, 32, 3), dtype=np.uint8))
    jpeg = jpeg_file(smooth_photo(400, 300))
    return [
        {"bytes": b"definitely not an image", "path": None},
        {"bytes": good[: len(good) // 2], "path": None},
        {"bytes": jpeg[: len(jpeg) // 2], "path": "photo.jpg"},
        {"bytes": None, "path": str(tmp_path / "missing.png")},
        None,
    ]


REASONS = ["UnidentifiedImageError", "truncated", "photo.jpg", "missing.png", "neither image bytes nor a path"]


@pytest.mark.parametrize("train", [True, False])
def test_images_that_cannot_be_decoded_are_reported_and_dropped(processor, tmp_path, caplog, train):
    dataset = image_dataset(2, decode=False, extra_cells=corrupt_cells(tmp_path))
    dataset.set_transform(SimMIMTransform(processor, train=train))
    with caplog.at_level("WARNING", logger="hf_simmim.data.transforms"):
        rows = [dataset[i] for i in range(7)]
    assert [row["pixel_values"] is None for row in rows] == [False, False, True, True, True, True, True]
    skips = [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]
    assert len(skips) == 5 and all(reason in skip for reason, skip in zip(REASONS, skips))
    batch = collate_fn(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["bool_masked_pos"].shape == (2, 8, 8)
    assert batch["labels"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="No image of this batch could be decoded"):
        collate_fn(rows[2:])


def noise_png(seed):
    return png_bytes(np.random.RandomState(seed).randint(0, 256, (36, 40, 3), dtype=np.uint8))


def cut_png(seed):
    """A PNG whose header reads (the check passes it) but whose pixels stop half way: found only when decoded."""
    whole = noise_png(seed)
    return whole[: len(whole) // 2]


def skip_reports(caplog):
    return [r.getMessage() for r in caplog.records if "cannot be decoded" in r.getMessage()]


@pytest.mark.parametrize("train", [True, False])
def test_each_undecodable_image_is_reported_once_by_the_check_or_the_first_read(processor, caplog, train):
    cells = [{"bytes": noise_png(i), "path": f"{i}.png"} for i in range(7)]
    cells[2] = {"bytes": b"garbage", "path": "garbage.png"}  # its header cannot be read: the check finds it
    cells[5] = {"bytes": cut_png(5), "path": "cut.png"}  # its pixels cannot be decoded: the first read finds it
    raw = image_dataset(0, decode=False, extra_cells=cells)
    split = "train" if train else "validation"
    with caplog.at_level("WARNING"):
        unreadable = check_image_dataset(raw, "image", 16, split)
        dataset = SeededImageDataset(
            raw, SimMIMTransform(processor, train=train, keep_columns=()), split=split, unreadable_rows=unreadable
        )
        assert dataset.unreadable_mask.tolist() == [False, False, True, False, False, False, False]  # before reading
        assert len(dataset) == 6  # row 2 is left out of every epoch
        for epoch in range(2):
            dataset.set_epoch(epoch)
            batches = [dataset.batch([0, 1, 2, 3]), dataset.batch([4, 5])]
            assert [batch["pixel_values"].shape[0] for batch in batches] == [4, 2]
    reports = skip_reports(caplog)
    assert len(reports) == 2
    assert f"{split} row 2 (garbage.png)" in reports[0] and "UnidentifiedImageError" in reports[0]
    assert f"{split} row 5 (cut.png)" in reports[1] and "truncated" in reports[1]
    assert dataset.unreadable_mask.tolist() == [False, False, True, False, False, True, False]


def test_a_row_that_does_not_decode_is_served_the_next_row_that_does(processor):
    colours = {0: (200, 0, 0), 2: (0, 200, 0)}
    cells = [{"bytes": png_bytes(np.full((32, 32, 3), colours[i], dtype=np.uint8)) if i in colours else cut_png(i),
              "path": None} for i in range(4)]
    transform = SimMIMTransform(processor, train=False, keep_columns=("label",), uint8=True)
    dataset = SeededImageDataset(image_dataset(0, decode=False, extra_cells=cells), transform, split="validation")
    # position -> the row served: a bad row gets the next decodable one, wrapping around at the end
    for position, served in [(0, 0), (1, 2), (2, 2), (3, 0)]:
        batch = dataset.batch([position])  # a batch of one
        assert batch["labels"].tolist() == [served]
        assert (batch["pixel_values"][0].permute(1, 2, 0) == torch.tensor(colours[served], dtype=torch.uint8)).all()
    assert dataset.unreadable_mask.tolist() == [False, True, False, True]


def test_a_stand_in_row_is_drawn_with_the_seeds_of_the_row_it_replaces(processor):
    cells = [{"bytes": noise_png(0), "path": None}, {"bytes": cut_png(1), "path": None},
             {"bytes": noise_png(2), "path": None}]
    dataset = SeededImageDataset(image_dataset(0, decode=False, extra_cells=cells), SimMIMTransform(processor))
    stand_in, own = dataset.batch([1]), dataset.batch([2])
    assert not torch.equal(stand_in["pixel_values"], own["pixel_values"])  # not a second copy of row 2's sample
    assert not torch.equal(stand_in["bool_masked_pos"], own["bool_masked_pos"])
    assert torch.equal(dataset.batch([1])["pixel_values"], stand_in["pixel_values"])  # and reproducible


def test_a_split_none_of_whose_images_decodes_stops_with_a_message(processor):
    dataset = SeededImageDataset(
        image_dataset(0, decode=False, extra_cells=[{"bytes": cut_png(i), "path": None} for i in range(2)]),
        SimMIMTransform(processor),
    )
    with pytest.raises(ValueError, match="No image of the train split can be decoded"):
        dataset.batch([0])


def test_spawned_dataloader_workers_flag_rows_in_the_main_process(processor):
    """Workers started with spawn (not fork) get the dataset pickled: its epoch and flags must be the shared memory
    itself, not copies, or the counts would miss what the workers found."""
    cells = [{"bytes": noise_png(0), "path": None}, {"bytes": cut_png(1), "path": None},
             {"bytes": noise_png(2), "path": None}, {"bytes": noise_png(3), "path": None}]
    dataset = SeededImageDataset(image_dataset(0, decode=False, extra_cells=cells), SimMIMTransform(processor))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, num_workers=1, multiprocessing_context="spawn", persistent_workers=True,
        collate_fn=collate_fn,
    )
    dataset.set_epoch(3)
    from_workers = [batch["pixel_values"] for batch in loader]
    assert dataset.unreadable_mask.tolist() == [False, True, False, False]
    dataset.set_epoch(4)  # after the worker started: it must see the new epoch
    from_workers += [batch["pixel_values"] for batch in loader]
    dataset.set_epoch(3)
    expected = [dataset.batch([0, 1])["pixel_values"], dataset.batch([2, 3])["pixel_values"]]
    dataset.set_epoch(4)
    expected += [dataset.batch([0, 1])["pixel_values"], dataset.batch([2, 3])["pixel_values"]]
    assert all(torch.equal(a, b) for a, b in zip(from_workers, expected))


def test_a_bug_in_augmentation_is_not_taken_for_a_bad_image(processor, monkeypatch):
    def broken(self, image, rng=random):
        raise RuntimeError("bug in augmentation")

    monkeypatch.setattr(AugmentationPreset, "augment", broken)
    transform = SimMIMTransform(processor, train=True, keep_columns=())
    with pytest.raises(RuntimeError, match="bug in augmentation"):
        transform({"image": image_dataset(1, decode=False)["image"]})
    with pytest.raises(RuntimeError, match="bug in augmentation"):
        SeededImageDataset(image_dataset(1), transform).__getitems__([0])


def test_check_reads_every_header_and_names_small_and_unreadable_images(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(checks, "HEADER_BATCH_SIZE", 7)  # row numbers stay right across batches
    cells = [{"bytes": png_bytes(np.zeros((40, 40, 3), dtype=np.uint8)), "path": f"{i}.png"} for i in range(30)]
    cells[9] = {"bytes": png_bytes(np.zeros((40, 12, 3), dtype=np.uint8)), "path": "narrow.png"}
    with pytest.raises(ValueError, match=r"1 of 30 images .*\(row 9 \(narrow.png\) is 12x40\)"):
        check_image_dataset(image_dataset(0, decode=False, extra_cells=cells), "image", 16)
    good = png_bytes(np.zeros((40, 40, 3), dtype=np.uint8))
    cells[9] = {"bytes": good[: len(good) // 2], "path": "cut.png"}  # the header is whole: training will tell
    cells[20] = {"bytes": b"garbage", "path": "garbage.png"}
    cells[25] = {"bytes": b"not an image either", "path": None}
    with caplog.at_level("WARNING"):
        assert check_image_dataset(image_dataset(0, decode=False, extra_cells=cells), "image", 16) == [20, 25]
    reports = skip_reports(caplog)
    assert len(reports) == 2 and "cut.png" not in caplog.text
    assert "train row 20 (garbage.png): its image cannot be decoded (UnidentifiedImageError" in reports[0]


def test_only_the_main_process_reports_what_the_check_finds(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it in the second process
    cells = [{"bytes": noise_png(0), "path": None}, {"bytes": b"garbage", "path": None}]
    with caplog.at_level("WARNING"):
        assert check_image_dataset(image_dataset(0, decode=False, extra_cells=cells), "image", 16) == [1]
    assert skip_reports(caplog) == []


def test_missing_image_column_is_named(processor):
    transform = SimMIMTransform(processor, image_column="img")
    with pytest.raises(KeyError, match="img"):
        transform({"image": [], "label": []})


def test_cifar10_small_statistics_survive_the_pipeline(cifar10_small_dir, processor, tmp_path):
    """Evaluation preprocessing of 32x32 CIFAR images is the identity up to normalisation, so un-normalising
    the batch recovers the channel means the data set's README states (0.4913, 0.4821, 0.4465 on train)."""
    import datasets

    files = sorted(str(p) for p in cifar10_small_dir.glob("train-*.parquet"))
    dataset = datasets.load_dataset(
        "parquet", data_files={"train": files}, split="train[:600]", cache_dir=str(tmp_path)
    )
    dataset = dataset.with_transform(SimMIMTransform(processor, train=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=200, collate_fn=collate_fn)
    batches = list(loader)
    pixel_values = torch.cat([b["pixel_values"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert pixel_values.shape == (600, 3, 32, 32)
    assert set(labels.tolist()) == set(range(10))
    std, mean = torch.tensor(IMAGENET_DEFAULT_STD), torch.tensor(IMAGENET_DEFAULT_MEAN)
    images = pixel_values * std[:, None, None] + mean[:, None, None]
    assert images.min() >= -1e-6 and images.max() <= 1 + 1e-6
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.tensor([0.4913, 0.4821, 0.4465]), rtol=0, atol=0.02)


def test_a_folder_of_data_files_named_by_split_loads_as_those_splits(tmp_path):
    """`train-00000-of-00002.parquet`, `validation-...` (as `hf-simmim shard` and the hub name them) are splits; a
    folder whose file names say no split is all training data."""
    import datasets

    from hf_simmim.data import load_image_datasets

    def write(path, first, count):
        datasets.Dataset.from_dict({"image": [f"{i}.png" for i in range(first, first + count)]}).to_parquet(str(path))

    named, plain = tmp_path / "named", tmp_path / "plain"
    named.mkdir(), plain.mkdir()
    write(named / "train-00000-of-00002.parquet", 0, 3)
    write(named / "train-00001-of-00002.parquet", 3, 3)
    write(named / "validation-00000-of-00001.parquet", 6, 2)
    write(plain / "part-a.parquet", 0, 3)
    write(plain / "part-b.parquet", 3, 2)
    train, validation = load_image_datasets(train_dir=str(named), validation_split_percentage=0)
    assert train["image"] == [f"{i}.png" for i in range(6)] and validation["image"] == ["6.png", "7.png"]
    train, validation = load_image_datasets(train_dir=str(plain), validation_split_percentage=0)
    assert len(train) == 5 and validation is None
    streamed, streamed_validation = load_image_datasets(train_dir=str(named), streaming=True)
    assert streamed.num_shards == 2 and [row["image"] for row in streamed_validation] == ["6.png", "7.png"]
