"""User masks (`mask_strategy="user"`, `--mask_column`): the snapping rule, masks kept aligned with their image
through crop and flip, the errors before training, and a pretraining run on them."""

import io
import json
import random

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_simmim import SimMIMConfig, SimMIMImageProcessor
from hf_simmim.data import AugmentationPreset, pretraining_augmentation
from hf_simmim.data.checks import check_image_dataset
from hf_simmim.data.transforms import SimMIMTransform
from hf_simmim.models.masking import SimMIMMaskGenerator, snap_mask_to_patches
from hf_simmim.reporting.pictures import reconstruct_images, unnormalize

from conftest import load_script


def png(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def left_columns(width, masked_columns, height=32):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, :masked_columns] = 255
    return mask


def user_processor(**kwargs):
    return SimMIMImageProcessor(image_size=32, patch_size=4, mask_patch_size=8, mask_strategy="user", **kwargs)


# ---------------------------------------------------------------------------------------------- the rule
def test_a_patch_is_masked_when_at_least_half_of_its_pixels_are():
    mask = np.zeros((4, 12), dtype=bool)
    mask[:, 0:4] = True  # patch 0: 16 of 16
    mask[:2, 4:8] = True  # patch 1: 8 of 16, exactly half
    mask[:, 8] = True  # patch 2: 4 of 16
    mask[0, 9:12] = True  # + 3 = 7 of 16
    np.testing.assert_array_equal(snap_mask_to_patches(mask, 4), [[True, True, False]])
    np.testing.assert_array_equal(snap_mask_to_patches(mask.astype(np.float32) * 0.6, 4), [[True, False, False]])
    with pytest.raises(ValueError, match="does not split into 5-pixel patches"):
        snap_mask_to_patches(mask, 5)


def test_the_user_strategy_draws_no_mask_and_names_where_masks_come_from():
    generator = SimMIMMaskGenerator(32, 8, 4, 0.6, mask_strategy="user")
    with pytest.raises(ValueError, match="mask_strategy='user' takes each image's mask from the data.*--mask_column"):
        generator()
    assert SimMIMConfig.from_preset("vit-tiny-test", mask_strategy="user").mask_strategy == "user"


# ---------------------------------------------------------------------------------------------- the transform
@pytest.mark.parametrize("masked_columns, expected", [(16, 4), (14, 4), (13, 3)])
def test_evaluation_masks_follow_the_centre_crop_and_the_rule(masked_columns, expected):
    """32 px images at the model's size: 14 masked pixel columns cover 2 of the 4 columns of patch 3 (half:
    masked), 13 only one (a quarter: visible)."""
    image = np.full((32, 32, 3), 90, dtype=np.uint8)
    row = {"image": png(image), "mask": png(left_columns(32, masked_columns))}
    transform = SimMIMTransform(user_processor(), train=False, mask_column="mask", keep_columns=())
    output, error = transform.transform_row(row)
    assert error is None
    expected_mask = np.zeros((8, 8), dtype=bool)
    expected_mask[:, :expected] = True
    np.testing.assert_array_equal(output["bool_masked_pos"], expected_mask)


def test_a_larger_mask_is_resized_and_cropped_as_its_image():
    """A 64 x 48 image is resized to 42 x 32 and its centre 32 columns cropped (5 cut on the left): a mask of its
    left 16 px (a quarter) covers 10.5 of the 42 resized columns, 5.5 of the crop: patch 0 is masked, patch 1
    (1.5 of its 4 columns) is not. Without the crop, 2.6 patches would be."""
    row = {"image": png(np.zeros((48, 64, 3), np.uint8)), "mask": png(left_columns(64, 16, height=48))}
    output, _ = SimMIMTransform(user_processor(), train=False, mask_column="mask").transform_row(row)
    assert output["bool_masked_pos"][:, 0].all() and not output["bool_masked_pos"][:, 1:].any()


@pytest.mark.parametrize("channels", [3, 1])
def test_training_masks_are_cropped_and_flipped_with_their_image(channels):
    """The image shows its own mask (bright where masked): after every random crop and flip, the patches the mask
    marks are the bright patches of the augmented image (but where a patch is about half bright: the image is
    resized with the preset's filter, the mask by area), and flips move them from one side to the other."""
    mask = left_columns(48, 16, height=48)
    image = np.repeat(mask[..., None], 3, axis=2) if channels == 3 else mask.astype(np.float32) / 255.0
    processor = user_processor() if channels == 3 else user_processor(
        num_channels=1, image_mean=[0.0], image_std=[1.0], do_convert_rgb=False, rescale_factor=1.0
    )
    row = {"image": png(image) if channels == 3 else image, "mask": png(mask)}
    transform = SimMIMTransform(processor, train=True, mask_column="mask", keep_columns=())
    sides = set()
    for seed in range(12):
        transform.rng = random.Random(seed)
        output, _ = transform.transform_row(row)
        shown = unnormalize(output["pixel_values"][None], processor.image_mean, processor.image_std)[0].mean(0)
        share = shown.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        masked, clear = output["bool_masked_pos"], np.abs(share - 0.5) > 0.2
        assert clear.mean() >= 0.75 and ((share >= 0.5) == masked)[clear].all(), seed
        if masked.any():
            sides.add("left" if masked[:, 0].any() else "right")
    assert sides == {"left", "right"}


def test_a_mask_column_needs_the_user_strategy_and_the_strategy_a_column():
    with pytest.raises(ValueError, match="A mask column \\('mask'\\) gives the masks of mask_strategy='user'"):
        SimMIMTransform(SimMIMImageProcessor(image_size=32, patch_size=4, mask_patch_size=8), mask_column="mask")
    with pytest.raises(ValueError, match="mask_strategy='user' takes each image's mask from a column"):
        SimMIMTransform(user_processor())
    assert SimMIMTransform(user_processor(), with_mask=False).mask_column is None  # fine-tuning: no masks at all
    with pytest.raises(ValueError, match="RandAugment .* would move the image away from its user mask"):
        SimMIMTransform(user_processor(), mask_column="mask",
                        augmentation=AugmentationPreset("x", 32, rand_augment="rand-m9-mstd0.5-inc1"))


# ---------------------------------------------------------------------------------------------- before training
def masked_dataset(mask_cells, size=32):
    image = png(np.zeros((size, size, 3), np.uint8))
    return datasets.Dataset.from_dict({"image": [image] * len(mask_cells), "mask": mask_cells})


def test_the_check_names_a_missing_column_and_masks_of_another_size_or_unreadable():
    processor = user_processor()
    good = png(left_columns(32, 8))
    with pytest.raises(ValueError, match=r"The mask column 'masks' is not in the train split; its columns are "
                       r"\['image', 'mask'\]. Pass the right one with --mask_column"):
        check_image_dataset(masked_dataset([good]), "image", 8, "train", processor, "masks")
    bad = masked_dataset([good, png(left_columns(16, 8, height=16)), {"bytes": b"not a mask", "path": None}])
    with pytest.raises(ValueError, match=r"2 of 3 images of the train split have no usable user mask \(column "
                       r"'mask'\) \(row 1 has a 16x16 px mask for a 32x32 px image; row 2 has a mask that cannot be read"):
        check_image_dataset(bad, "image", 8, "train", processor, "mask")
    array_masks = masked_dataset([np.ones((32, 32), bool).tolist()])  # an array column of masks
    assert check_image_dataset(array_masks, "image", 8, "train", processor, "mask") == []


def test_run_mim_pretrains_on_a_mask_column_and_refuses_a_missing_one(tmp_path):
    rng = np.random.default_rng(0)
    rows = {"image": [], "defect": []}
    for _ in range(12):
        rows["image"].append(png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        mask = np.zeros((32, 32), np.uint8)
        top, left = rng.integers(0, 16, size=2)
        mask[top : top + 16, left : left + 16] = 255
        rows["defect"].append(png(mask))
    features = datasets.Features({"image": datasets.Image(), "defect": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    run_mim = load_script("examples/run_mim.py")
    common = ["--train_dir", str(tmp_path / "data.parquet"), "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--report_to", "none", "--num_reconstruction_images", "2", "--validation_split_percentage", "25"]
    with pytest.raises(ValueError, match="The mask column 'defects' is not in the train split"):
        run_mim.main(common + ["--mask_column", "defects", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    out = tmp_path / "run"
    assert run_mim.main(common + ["--mask_column", "defect", "--output_dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["mask_strategy"] == "user"
    card = (out / "README.md").read_text()
    assert "user: each image's own mask from the data" in card and "user masks from column `defect`" in card
    assert (out / "reconstruction.png").is_file()
    # new images have no user mask: reconstructing them needs a drawn strategy, named
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "new.png")
    with pytest.raises(ValueError, match="pretrained with user masks .* pass --mask_strategy NAME"):
        reconstruct_images(str(out), [str(tmp_path / "new.png")], str(tmp_path / "grid.png"))
    grid = reconstruct_images(str(out), [str(tmp_path / "new.png")], str(tmp_path / "grid.png"), mask_strategy="center")
    assert Image.open(grid).width >= 4 * 96
