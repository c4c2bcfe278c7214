"""SimMIMImageProcessor keeps transformers' image-processor contracts: the input kinds transformers' processors take
(PIL, NumPy, torch; channels first or last; uint8 or floats; single images, lists, 4-D batches), the model's channel
count, the standard per-call keywords, unknown keywords refused, NumPy outputs unless tensors are asked for, and the
PIL backend declared as transformers declares it. transformers' own ImageProcessingTestMixin runs against it outside
this repository (its test code is not ours to commit).

References are independent of the processor: PIL's resize and crop with sizes worked out by hand in each test, the
textbook `(pixel / 255 - mean) / std`, and transformers' `ViTImageProcessorPil` for transformers' conventions."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_processing_backends import PilBackend
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from hf_simmim import SimMIMConfig, SimMIMImageProcessor
from hf_simmim.models.image_processing_simmim import SimMIMImageProcessorKwargs

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
# 40 x 50 (h x w) at 32 px, crop_pct 1: shorter side 40 -> 32, longer int(32 * 50 / 40) = 40; centre crop left
# int(round(8 / 2)) = 4, top 0.
RESIZED, BOX = (40, 32), (4, 0, 36, 32)


def photo(height=40, width=50, channels=3, seed=0):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)


def textbook(pixels_hwc, mean=MEAN, std=STD):
    """`(pixel / 255 - mean) / std`, channels first, in float64."""
    return ((np.asarray(pixels_hwc, dtype=np.float64) / 255 - mean) / std).transpose(2, 0, 1)


def expected_rgb(array):
    return textbook(Image.fromarray(array).resize(RESIZED, Image.BICUBIC).crop(BOX))


@pytest.fixture
def processor():
    return SimMIMImageProcessor(image_size=32, patch_size=4, mask_patch_size=8)


# ---------------------------------------------------------------------------------------------- input kinds
def test_every_input_kind_gives_the_pixels_of_the_pil_image(processor):
    array = photo()
    expected = expected_rgb(array)
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    kinds = {
        "PIL": Image.fromarray(array),
        "NumPy HWC": array,
        "NumPy CHW": chw,
        "torch CHW": torch.from_numpy(chw),
        "torch HWC": torch.from_numpy(array.copy()),
    }
    for kind, image in kinds.items():
        out = processor(image, return_tensors="np")["pixel_values"]
        assert out.shape == (1, 3, 32, 32), kind
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5, err_msg=kind)
    batches = {
        "list": [Image.fromarray(array), array, torch.from_numpy(chw)],
        "NumPy 4-D": np.stack([array] * 3),
        "torch 4-D": torch.from_numpy(np.stack([chw] * 3)),
    }
    for kind, images in batches.items():
        out = processor(images, return_tensors="pt")["pixel_values"]
        assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32, kind
        np.testing.assert_allclose(out.numpy(), np.stack([expected] * 3), rtol=0, atol=1e-5, err_msg=kind)


def test_float_images_in_0_1_are_taken_with_do_rescale_false(processor):
    """A 32 x 40 image needs no resize at 32 px (only the crop, left int(round(8 / 2)) = 4), so floats come out
    exactly as their uint8 counterpart."""
    array = photo(32, 40)
    expected = textbook(array[:, 4:36])
    floats = array.astype(np.float32) / 255
    for image in (floats, torch.from_numpy(floats.transpose(2, 0, 1).copy()), floats.astype(np.float64)):
        out = processor(image, do_rescale=False, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- channels
def test_a_one_channel_model_keeps_one_channel():
    config = SimMIMConfig.from_preset("vit-tiny-test", num_channels=1)
    processor = SimMIMImageProcessor.from_model_config(config, image_mean=[0.5], image_std=[0.25])
    assert processor.num_channels == 1
    gray = photo(channels=1)
    resized = Image.fromarray(gray).resize(RESIZED, Image.BICUBIC).crop(BOX)
    expected = textbook(np.asarray(resized)[..., None], 0.5, 0.25)
    for image in (Image.fromarray(gray), gray, gray[None], torch.from_numpy(gray[None].copy()), gray[..., None]):
        out = processor(image, return_tensors="np")["pixel_values"]
        assert out.shape == (1, 1, 32, 32)
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-5)


def test_a_four_channel_model_keeps_alpha():
    processor = SimMIMImageProcessor(image_size=32, num_channels=4, image_mean=[0.5] * 4, image_std=[0.5] * 4)
    rgba = photo(channels=4)
    for image in (Image.fromarray(rgba), rgba, torch.from_numpy(rgba.transpose(2, 0, 1).copy())):
        out = processor(image, return_tensors="np")["pixel_values"][0]
        assert out.shape == (4, 32, 32)
        channels = [Image.fromarray(rgba[..., c]).resize(RESIZED, Image.BICUBIC).crop(BOX) for c in range(4)]
        expected = (np.stack(channels).astype(np.float64) / 255 - 0.5) / 0.5
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


def test_other_channel_counts_need_their_mean_and_std():
    with pytest.raises(ValueError, match="num_channels=1 needs image_mean and image_std of 1 values.*image_mean"):
        SimMIMImageProcessor(num_channels=1)
    with pytest.raises(ValueError, match=r"image_std=.*has 3 values for num_channels=4"):
        SimMIMImageProcessor(num_channels=4, image_mean=[0.5] * 4, image_std=[0.5] * 3)
    rgb_model = SimMIMImageProcessor(image_size=32)
    with pytest.raises(ValueError, match="image_mean has 3 and image_std 3 values, but the image has 4 channel"):
        rgb_model(photo(channels=4), do_convert_rgb=False)
    five_channels = np.zeros((5, 40, 50), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"Cannot tell the channel axis .* pass input_data_format='channels_first'"):
        rgb_model(five_channels)
    with pytest.raises(ValueError, match="Cannot convert a 5-channel image to RGB: pass do_convert_rgb=False"):
        rgb_model(five_channels, input_data_format="channels_first")


def test_a_three_channel_model_converts_to_rgb_as_pil_does():
    """Grey repeats to three channels; alpha 0 composites to white and alpha 255 keeps the colour."""
    processor = SimMIMImageProcessor(image_size=6, do_normalize=False, do_rescale=False)
    gray = np.full((6, 6), 77, dtype=np.uint8)
    for image in (gray, [gray], torch.from_numpy(gray), Image.fromarray(gray)):
        np.testing.assert_array_equal(processor(image)["pixel_values"][0], np.full((3, 6, 6), 77))
    rgba = np.zeros((6, 6, 4), dtype=np.uint8)
    rgba[..., :3], rgba[:3, :, 3], rgba[3:, :, 3] = (10, 20, 30), 0, 255
    out = processor(rgba)["pixel_values"][0]
    np.testing.assert_array_equal(out[:, :3], np.full((3, 3, 6), 255))
    np.testing.assert_array_equal(out[:, 3:], np.array([10, 20, 30])[:, None, None] * np.ones((3, 3, 6)))
    np.testing.assert_array_equal(processor(Image.fromarray(rgba))["pixel_values"][0], out)
    floats = rgba.astype(np.float32) / 255
    np.testing.assert_allclose(processor(floats)["pixel_values"][0], out / 255, rtol=0, atol=1e-6)
    kept = processor(rgba, do_convert_rgb=False)["pixel_values"][0]
    assert kept.shape == (4, 6, 6)


# ---------------------------------------------------------------------------------------------- keywords
def test_per_call_keywords_are_honoured(processor):
    array = photo()
    image = Image.fromarray(array)
    resized = Image.fromarray(array).resize(RESIZED, Image.BICUBIC)
    calls = {
        # crop of the original only: left int(round(18 / 2)) = 9, top int(round(8 / 2)) = 4
        "do_resize": ({"do_resize": False}, textbook(Image.fromarray(array).crop((9, 4, 41, 36)))),
        "do_center_crop": ({"do_center_crop": False}, textbook(resized)),
        "do_rescale": ({"do_rescale": False}, ((np.asarray(resized.crop(BOX)) - MEAN) / STD).transpose(2, 0, 1)),
        "rescale_factor": ({"rescale_factor": 0.5}, textbook(np.asarray(resized.crop(BOX)) * 127.5)),
        "do_normalize": ({"do_normalize": False}, np.asarray(resized.crop(BOX)).transpose(2, 0, 1) / 255),
        "image_mean/std": ({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}, textbook(resized.crop(BOX), 0.5, 0.5)),
        # size 16: shorter side 40 -> 16, longer int(16 * 50 / 40) = 20; left int(round(4 / 2)) = 2
        "size": ({"size": 16}, textbook(Image.fromarray(array).resize((20, 16), Image.BICUBIC).crop((2, 0, 18, 16)))),
        # crop_pct 0.8: shorter side int(32 / 0.8) = 40, no resize; left int(round(18 / 2)) = 9, top 4
        "crop_pct": ({"crop_pct": 0.8}, textbook(Image.fromarray(array).crop((9, 4, 41, 36)))),
        "resample": ({"resample": Image.NEAREST}, textbook(Image.fromarray(array).resize(RESIZED, 0).crop(BOX))),
    }
    for name, (keywords, expected) in calls.items():
        out = processor(image, return_tensors="np", **keywords)["pixel_values"][0]
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5, err_msg=name)
    assert processor.do_resize and processor.image_size == 32  # a call leaves the processor as it was
    channels_last = processor(image, data_format="channels_last", return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(channels_last, expected_rgb(array).transpose(1, 2, 0), rtol=0, atol=1e-5)
    ambiguous = np.random.RandomState(1).randint(0, 256, (3, 32, 3), dtype=np.uint8)  # 3 rows of 32 x 3 pixels?
    first = processor(ambiguous, input_data_format="channels_first", do_resize=False, do_center_crop=False)
    assert first["pixel_values"][0].shape == (3, 32, 3)


def test_without_rescale_and_normalisation_uint8_stays_uint8_as_in_transformers(processor):
    image = Image.fromarray(photo())
    ours = processor(image, do_rescale=False, do_normalize=False)["pixel_values"][0]
    theirs = ViTImageProcessorPil()(image, do_rescale=False, do_normalize=False)["pixel_values"][0]
    assert ours.dtype == theirs.dtype == np.uint8
    expected = np.asarray(image.resize(RESIZED, Image.BICUBIC).crop(BOX)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ours, expected)


def test_masks_follow_the_call_size(processor):
    image = Image.fromarray(photo())
    out = processor([image] * 2, size={"height": 16, "width": 16}, return_bool_masked_pos=True, mask_seed=0)
    assert [mask.shape for mask in out["bool_masked_pos"]] == [(4, 4)] * 2  # 16 px / patch 4
    assert [int(mask.sum()) for mask in out["bool_masked_pos"]] == [3 * 4] * 2  # ceil(0.6 * 2 * 2) squares of 2x2
    with pytest.raises(ValueError, match="return_bool_masked_pos=True draws masks for 32 x 32 images"):
        processor(image, do_center_crop=False, return_bool_masked_pos=True)


def test_unknown_and_unused_keywords_are_refused_by_name(processor):
    image = Image.fromarray(photo())
    with pytest.raises(ValueError, match="unknown keyword argument.* do_flip"):
        processor(image, do_flip=True)
    with pytest.raises(ValueError, match="crop_size is not used"):
        processor(image, crop_size={"height": 16, "width": 16})
    with pytest.raises(ValueError, match="is not a square"):
        processor(image, size={"height": 16, "width": 24})
    with pytest.raises(ValueError, match=r"crop_pct=0.0 must lie in"):
        processor(image, crop_pct=0.0)


# ---------------------------------------------------------------------------------------------- outputs, backend
def test_return_tensors_none_gives_numpy_arrays_as_transformers(processor):
    images = [Image.fromarray(photo(seed=seed)) for seed in range(2)]
    ours = processor(images, return_bool_masked_pos=True)
    theirs = ViTImageProcessorPil()(images)
    assert type(ours["pixel_values"]) is type(theirs["pixel_values"]) is list
    assert all(isinstance(value, np.ndarray) for value in ours["pixel_values"] + ours["bool_masked_pos"])
    assert ours["pixel_values"][0].shape == (3, 32, 32) and ours["bool_masked_pos"][0].dtype == bool
    stacked = processor(images, return_tensors="np")["pixel_values"]
    assert isinstance(stacked, np.ndarray) and stacked.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(stacked, np.stack(ours["pixel_values"]))


def test_the_pil_backend_is_declared_as_transformers_declares_it(processor, tmp_path):
    assert isinstance(processor, PilBackend) and processor.backend == ViTImageProcessorPil().backend == "pil"
    assert processor.valid_kwargs is SimMIMImageProcessorKwargs
    assert processor.model_input_names == ["pixel_values"]
    SimMIMImageProcessor(image_size=32, num_channels=1, image_mean=[0.5], image_std=[0.5]).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(loaded) is SimMIMImageProcessor and loaded.num_channels == 1 and loaded.image_size == 32
