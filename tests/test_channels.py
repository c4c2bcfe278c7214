"""Images that are not RGB photos: reading any channel count at its own precision (16-bit PNG/TIFF, multi-page TIFF,
.npy files and array cells), their headers, the array crops against the RGB path's, the per-channel statistics
against NumPy, and the data path keeping 16-bit precision."""

import io
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_simmim import SimMIMImageProcessor
from hf_simmim.data import AugmentationPreset, finetuning_augmentation, pretraining_augmentation
from hf_simmim.data.checks import check_image_dataset, run_pixel_format
from hf_simmim.data.image_ops import UndecodableImage
from hf_simmim.data.loading import load_local_dataset
from hf_simmim.data.pixels import pixel_header, read_pixels, rescale_factor_for
from hf_simmim.data.statistics import channel_statistics, dataset_statistics, merge_moments
from hf_simmim.data.transforms import SimMIMTransform, collate_fn

RNG = np.random.default_rng(0)


def png16(array):
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def processor_for(num_channels, mean=0.0, std=1.0, rescale_factor=1 / 65535, **kwargs):
    return SimMIMImageProcessor(
        image_size=32, patch_size=4, mask_patch_size=8, num_channels=num_channels, image_mean=[mean] * num_channels,
        image_std=[std] * num_channels, do_convert_rgb=False, rescale_factor=rescale_factor, **kwargs,
    )


# ---------------------------------------------------------------------------------------------- reading cells
def test_a_16_bit_png_is_read_at_16_bits_and_its_header_without_decoding():
    values = (np.arange(20 * 12).reshape(12, 20) * 257 + 3).astype(np.uint16)
    cell = {"bytes": png16(values), "path": None}
    pixels = read_pixels(cell)
    assert pixels.dtype == np.uint16 and pixels.shape == (1, 12, 20)
    np.testing.assert_array_equal(pixels[0], values)
    header = pixel_header(cell)
    assert (header.width, header.height, header.channels, header.dtype) == (20, 12, 1, "uint16")
    assert rescale_factor_for(header.dtype) == 1 / 65535 and rescale_factor_for("uint8") == 1 / 255
    assert rescale_factor_for("float32") == 1.0


@pytest.mark.parametrize("layout", ["chw", "hwc", "hw"])
def test_arrays_are_read_channels_first_from_npy_files_bytes_and_array_cells(tmp_path, layout):
    chw = RNG.random((5, 10, 14)).astype(np.float32)
    stored = {"chw": chw, "hwc": chw.transpose(1, 2, 0), "hw": chw[0]}[layout]
    expected = chw if layout != "hw" else chw[:1]
    np.save(tmp_path / "x.npy", stored)
    cells = [str(tmp_path / "x.npy"), {"bytes": npy_bytes(stored), "path": None}, stored, stored.tolist()]
    for cell in cells:
        np.testing.assert_array_equal(read_pixels(cell, num_channels=expected.shape[0]), expected)
        header = pixel_header(cell, num_channels=expected.shape[0])
        assert (header.width, header.height, header.channels) == (14, 10, expected.shape[0])


def test_the_channel_axis_is_the_one_of_the_models_count_else_the_shorter_end():
    assert read_pixels(np.zeros((4, 6, 3)), num_channels=4).shape == (4, 6, 3)  # 4 channels of 6 x 3
    assert read_pixels(np.zeros((4, 6, 3)), num_channels=3).shape == (3, 4, 6)  # 3 channels of 4 x 6
    assert read_pixels(np.zeros((13, 64, 64))).shape == (13, 64, 64)
    assert read_pixels(np.zeros((64, 64, 13))).shape == (13, 64, 64)


def test_an_npy_header_reads_without_its_pixels_and_a_truncated_file_fails_to_decode(tmp_path):
    data = npy_bytes(np.ones((3, 8, 8), dtype=np.float32))
    truncated = {"bytes": data[:-40], "path": None}
    assert pixel_header(truncated).channels == 3
    with pytest.raises(UndecodableImage):
        read_pixels(truncated)


def test_a_multi_page_tiff_gives_one_channel_per_page(tmp_path):
    pages = [Image.fromarray(RNG.random((9, 7)).astype(np.float32)) for _ in range(4)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    pixels = read_pixels(str(tmp_path / "stack.tif"))
    assert pixels.shape == (4, 9, 7) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[2], np.asarray(pages[2]))
    assert pixel_header(str(tmp_path / "stack.tif")).channels == 4


def test_a_multi_band_tiff_is_read_through_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    bands = RNG.integers(0, 65535, size=(16, 12, 6), dtype=np.uint16)  # samples per pixel: Pillow cannot read it
    tifffile.imwrite(tmp_path / "bands.tif", bands, photometric="minisblack", planarconfig="contig")
    pixels = read_pixels(str(tmp_path / "bands.tif"))
    np.testing.assert_array_equal(pixels, bands.transpose(2, 0, 1))
    header = pixel_header(str(tmp_path / "bands.tif"))
    assert (header.width, header.height, header.channels, header.dtype) == (12, 16, 6, "uint16")


# ---------------------------------------------------------------------------------------------- precision
def test_16_bit_values_keep_more_than_8_bits_through_the_data_path():
    values = (20000 + np.arange(32 * 32).reshape(32, 32) * 7).astype(np.uint16)  # 1024 levels, 7 apart
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": png16(values), "path": None}]},
                                         features=datasets.Features({"image": datasets.Image()}))
    processor = processor_for(1)  # mean 0, std 1: pixel_values are the pixels / 65535
    exact = AugmentationPreset("identity", 32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_prob=0.0)
    for train in (False, True):
        transform = SimMIMTransform(processor, train=train, augmentation=exact, keep_columns=())
        batch = collate_fn([transform.transform_row(row)[0] for row in dataset.cast_column("image", datasets.Image(decode=False))])
        recovered = batch["pixel_values"][0, 0].double().numpy() * 65535
        assert len(np.unique(np.round(recovered))) == 1024  # 8 bits would hold 256 levels at most
        np.testing.assert_allclose(recovered, values, atol=0.02)
    # the same image read by an RGB model is squeezed to 8 bits, as before
    rgb = SimMIMImageProcessor(image_size=32, patch_size=4, mask_patch_size=8)
    converted = SimMIMTransform(rgb, train=False).image_to_array({"bytes": png16(values), "path": None})
    assert len(np.unique(converted[0])) <= 256


def test_the_header_check_refuses_images_of_another_channel_count_or_pixel_type():
    cells = [npy_bytes(np.zeros((2, 16, 16), np.float32)), npy_bytes(np.zeros((3, 16, 16), np.float32)),
             npy_bytes(np.zeros((2, 16, 16), np.uint8))]
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": c, "path": None} for c in cells]})
    assert run_pixel_format(dataset, "image", 2) == (False, 1.0)
    processor = processor_for(2, rescale_factor=1.0)
    with pytest.raises(ValueError, match=r"2 of 3 images of the train split do not fit the run \(row 1 has 3 "
                       r"channel\(s\), the model takes num_channels=2; row 2 holds uint8 pixels"):
        check_image_dataset(dataset, "image", 8, "train", processor)
    with pytest.raises(ValueError, match=r"have 2 channel\(s\) \(row 0: 16x16 px.*takes num_channels=3.*--num_channels 2"):
        run_pixel_format(dataset, "image", 3)


def test_a_three_channel_model_reads_photos_as_rgb_and_arrays_as_they_are():
    photo = io.BytesIO()
    Image.new("L", (16, 16), 90).save(photo, format="PNG")
    photos = datasets.Dataset.from_dict({"image": [{"bytes": photo.getvalue(), "path": None}]})
    assert run_pixel_format(photos, "image", 3) == (True, 1 / 255)
    arrays = datasets.Dataset.from_dict({"image": [{"bytes": npy_bytes(np.zeros((3, 16, 16), np.uint8)), "path": None}]})
    assert run_pixel_format(arrays, "image", 3) == (False, 1 / 255)


# ---------------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("preset", [pretraining_augmentation(32), finetuning_augmentation(32, None, 0.0),
                                    finetuning_augmentation(48, None, 0.0)])
def test_array_crops_are_the_rgb_paths_crops(preset):
    """uint8 channels resized as 8-bit images give the pixels of the RGB path (same draws, same filter); float
    channels the same within the 8-bit path's rounding (PIL resizes 8-bit images in two rounded passes; a smooth
    image, so that no bicubic overshoot is clipped): the array path is the same geometry at full precision."""
    noise = RNG.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    y, x = np.mgrid[0:40, 0:50]
    smooth = np.stack([125 + 90 * np.sin(x / 7 + c) * np.cos(y / 5 - c) for c in range(3)], -1).round().astype(np.uint8)
    for seed in range(6):
        expected = np.asarray(preset.augment(Image.fromarray(noise), random.Random(seed))).transpose(2, 0, 1)
        as_uint8 = preset.augment(np.ascontiguousarray(noise.transpose(2, 0, 1)), random.Random(seed))
        np.testing.assert_array_equal(as_uint8, expected)
        expected = np.asarray(preset.augment(Image.fromarray(smooth), random.Random(seed))).transpose(2, 0, 1)
        as_float = preset.augment(smooth.transpose(2, 0, 1).astype(np.float32), random.Random(seed))
        assert as_float.dtype == np.float32
        np.testing.assert_allclose(as_float, expected, atol=1.5)


def test_rand_augment_is_refused_for_images_that_keep_their_channels():
    with pytest.raises(ValueError, match=r"RandAugment \(rand-m9-mstd0.5-inc1\) is defined on 8-bit RGB images.*"
                       "--rand_augment none"):
        SimMIMTransform(processor_for(1), train=True, with_mask=False, augmentation=finetuning_augmentation(32))


# ---------------------------------------------------------------------------------------------- statistics
def test_channel_statistics_match_numpy_over_all_pixels(tmp_path):
    images = [RNG.integers(1000, 60000, size=(h, w), dtype=np.uint16) for h, w in ((20, 30), (33, 17), (25, 25))]
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{index}.png")
    dataset = load_local_dataset(str(tmp_path))["train"]
    statistics = dataset_statistics(dataset, "image", progress=False)
    everything = np.concatenate([image.ravel() for image in images]) / 65535.0
    np.testing.assert_allclose(statistics.mean, [everything.mean()], rtol=1e-12)
    np.testing.assert_allclose(statistics.std, [everything.std()], rtol=1e-12)
    assert (statistics.images, statistics.pixels, statistics.pixel_type) == (3, everything.size, "uint16")


def test_channel_statistics_of_arrays_and_of_rgb_photos_match_numpy():
    arrays = [RNG.normal(5.0, 2.0, size=(4, h, w)).astype(np.float32) for h, w in ((8, 9), (12, 5))]
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": npy_bytes(a), "path": None} for a in arrays]})
    statistics = channel_statistics(dataset, "image", progress=False)
    pixels = np.concatenate([a.reshape(4, -1) for a in arrays], axis=1).astype(np.float64)
    np.testing.assert_allclose(statistics.mean, pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(statistics.std, pixels.std(axis=1), rtol=1e-12)
    photos = [Image.fromarray(RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8)), Image.new("L", (5, 5), 77)]
    cells = []
    for photo in photos:
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        cells.append({"bytes": buffer.getvalue(), "path": None})
    rgb = dataset_statistics(datasets.Dataset.from_dict({"image": cells}), "image", num_channels=3, progress=False)
    pixels = np.concatenate([np.asarray(p.convert("RGB")).reshape(-1, 3) for p in photos]) / 255.0
    np.testing.assert_allclose(rgb.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rgb.std, pixels.std(axis=0), rtol=1e-12)


def test_merged_moments_keep_their_digits_far_from_zero():
    parts = [1e6 + RNG.normal(0, 1e-3, size=n) for n in (7, 1000, 3)]
    merged = None
    for part in parts:
        current = (part.size, np.array([part.mean()]), np.array([((part - part.mean()) ** 2).sum()]))
        merged = current if merged is None else merge_moments(merged, current)
    everything = np.concatenate(parts)
    np.testing.assert_allclose(np.sqrt(merged[2] / merged[0]), [everything.std()], rtol=1e-6)


def test_a_run_of_a_one_channel_model_saves_the_statistics_of_its_training_images(tmp_path):
    from hf_simmim.training.runs import data_image_processor
    from hf_simmim import SimMIMConfig

    images = [RNG.integers(0, 4096, size=(32, 32), dtype=np.uint16) for _ in range(3)]
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": png16(i), "path": None} for i in images]})
    config = SimMIMConfig.from_preset("vit-tiny-test", num_channels=1)
    processor = data_image_processor(config, {}, dataset, "image")
    everything = np.stack(images) / 65535.0
    assert processor.rescale_factor == 1 / 65535 and not processor.converts_to_rgb
    np.testing.assert_allclose(processor.image_mean, [everything.mean()], rtol=1e-9)
    np.testing.assert_allclose(processor.image_std, [everything.std()], rtol=1e-9)
    given = data_image_processor(config, {"image_mean": [0.1], "image_std": [0.2]}, dataset, "image")
    assert list(given.image_mean) == [0.1]  # given statistics: no pass
    processor.save_pretrained(tmp_path)
    reloaded = SimMIMImageProcessor.from_pretrained(tmp_path)
    expected = torch.tensor((images[0] / 65535.0 - processor.image_mean[0]) / processor.image_std[0])
    for image in (images[0], Image.fromarray(images[0])):  # an HW uint16 array, a 16-bit PIL image
        batch = reloaded(image, return_tensors="pt")
        torch.testing.assert_close(batch["pixel_values"][0, 0].double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature", ["array", "lists"])
def test_an_array_column_keeps_its_pixel_type_through_the_data_path(feature):
    """datasets gives array cells as nested lists (or int64 arrays): the data path reads them in the column's own
    type, so 16-bit arrays are rescaled as 16-bit images are."""
    from hf_simmim.data.transforms import SeededImageDataset

    values = [(30000 + RNG.integers(0, 5000, size=(2, 32, 32))).astype(np.uint16) for _ in range(3)]
    kind = datasets.Array3D((2, 32, 32), "uint16") if feature == "array" else datasets.List(
        datasets.List(datasets.List(datasets.Value("uint16"))))
    dataset = datasets.Dataset.from_dict({"bands": [v.tolist() for v in values], "label": [0, 1, 0]},
                                         features=datasets.Features({"bands": kind, "label": datasets.Value("int64")}))
    assert run_pixel_format(dataset, "bands", 2) == (False, 1 / 65535)
    assert check_image_dataset(dataset, "bands", 8, "train", processor_for(2)) == []
    transform = SimMIMTransform(processor_for(2), train=False, image_column="bands", with_mask=False,
                                keep_columns=("label",))
    batch = SeededImageDataset(dataset, transform).batch([0, 1, 2])
    np.testing.assert_allclose(batch["pixel_values"].double().numpy() * 65535, np.stack(values), atol=0.02)
    assert batch["labels"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("channels", [1, 5])
def test_the_decoder_and_loss_follow_num_channels(channels):
    """The reconstruction has the input's channels, and the loss is the official formula with C = num_channels:
    sum(|x - x_rec| * M) / (sum(M) + 1e-5) / C, M the pixel mask (per pixel, shared by the channels)."""
    from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling

    from conftest import tiny_vit

    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(SimMIMConfig(**tiny_vit(num_channels=channels))).eval()
    pixels = torch.randn(2, channels, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :3, 2:7] = True
    with torch.no_grad():
        output = model(pixel_values=pixels, bool_masked_pos=mask)
    assert output.reconstruction.shape == (2, channels, 32, 32)
    pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].float()
    expected = ((pixels - output.reconstruction).abs() * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / channels
    torch.testing.assert_close(output.loss, expected)


def test_a_checkpoint_normalised_for_16_bit_pixels_refuses_8_bit_images_unless_statistics_are_given(tmp_path):
    """Fine-tuning (and continued pretraining) keep the checkpoint's mean and std: computed on 16-bit pixels, they
    do not describe 8-bit ones (a 12-bit scan scaled by 1/65535 has a mean near 0.03, by 1/255 near 8)."""
    from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
    from hf_simmim.training.arguments import parse_finetune_arguments, parse_run_arguments
    from hf_simmim.training.finetuning import load_classification_model
    from hf_simmim.training.runs import data_image_processor, load_image_processor, saved_normalisation

    def images(dtype, high):
        arrays = [RNG.integers(0, high, size=(32, 32)).astype(dtype) for _ in range(2)]
        cells = []
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            cells.append({"bytes": buffer.getvalue(), "path": None})
        return datasets.Dataset.from_dict({"image": cells})

    sixteen, eight = images(np.uint16, 4096), images(np.uint8, 256)
    config = SimMIMConfig.from_preset("vit-tiny-test", num_channels=1)
    data_image_processor(config, {}, sixteen, "image").save_pretrained(tmp_path)
    SimMIMForMaskedImageModeling(config).save_pretrained(tmp_path)
    saved = saved_normalisation(str(tmp_path), {})
    assert saved["rescale_factor"] == pytest.approx(1 / 65535)
    with pytest.raises(ValueError, match=r"normalises uint16 pixels .* hold uint8 pixels .* Convert the images to uint16"):
        data_image_processor(config, saved, eight, "image")
    finetune_args = parse_finetune_arguments(["--model_name_or_path", str(tmp_path)])[0]
    with pytest.raises(ValueError, match=r"normalises uint16 pixels .* hold uint8 pixels"):
        load_classification_model(finetune_args, 2, train=eight, image_column="image")
    kept = data_image_processor(config, saved, sixteen, "image")
    assert list(kept.image_mean) == pytest.approx(saved["image_mean"])
    given = ["--model_name_or_path", str(tmp_path), "--image_mean", "0.5", "--image_std", "0.2"]
    processor = load_image_processor(parse_run_arguments(given)[0], config, {}, eight, "image")
    assert (list(processor.image_mean), processor.rescale_factor) == ([0.5], pytest.approx(1 / 255))
