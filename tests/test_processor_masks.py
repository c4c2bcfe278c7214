"""`SimMIMImageProcessor(images, masks=...)`: the user's own masks as `bool_masked_pos`, brought into the evaluation
view of their image and snapped to the patch grid; the same masks as the training data path's evaluation rows, the
errors before any work, and a model that takes the result.

References are independent of the code under test: patch grids worked out by hand (sizes and box-filter coverage in
each test's docstring), and a few-line reference (PIL's box resize at hand-computed sizes, a slice for the crop,
patch means >= 0.5)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.data.transforms import SimMIMTransform

# A 64 x 48 (w x h) image at 32 px, crop_pct 1: shorter side 48 -> 32, longer int(32 * 64 / 48) = 42; centre crop
# left int(round(10 / 2)) = 5, top 0. Vertically each output row covers 1.5 input rows.
WIDTH, HEIGHT = 64, 48


def processor(**kwargs):
    return SimMIMImageProcessor(image_size=32, patch_size=4, mask_patch_size=8, **kwargs)


def photo(height=HEIGHT, width=WIDTH, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(top, bottom, left, right, height=HEIGHT, width=WIDTH):
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def reference_patch_mask(mask, resized_width, resized_height, left, top, side=32, patch=4):
    """PIL's box resize of the mask to the hand-computed size, the crop as a slice, then patch means >= 0.5."""
    resized = Image.fromarray(mask.astype(np.float32), "F").resize((resized_width, resized_height), Image.BOX)
    crop = np.asarray(resized)[top : top + side, left : left + side]
    return crop.reshape(side // patch, patch, side // patch, patch).mean(axis=(1, 3)) >= 0.5


def patch_rows_and_columns(rows, columns, grid=8):
    expected = np.zeros((grid, grid), dtype=bool)
    expected[rows, columns] = True
    return expected


# ---------------------------------------------------------------------------------------------- the geometry
def test_a_box_is_resized_cropped_and_snapped_with_a_patch_at_exactly_half():
    """Input rows 0-14 masked: output rows 0-9 are masked (row 9 covers input rows 13.5-15), rows 10-11 not, so
    patch row 2 (output rows 8-11) is exactly half masked: masked. One row less (0-13) leaves output row 9 a third
    masked and patch row 2 at (1 + 1/3 + 0 + 0) / 4 = 1/3: visible. Input columns 0-15 cover resized columns
    0-10.5 (x 42 / 64), crop columns 0-5.5: patch column 0 fully, patch column 1 (crop columns 4-7) 1.5 / 4:
    visible."""
    out = processor()(photo(), masks=[box_mask(0, 15, 0, 16)])
    np.testing.assert_array_equal(out["bool_masked_pos"][0], patch_rows_and_columns(slice(0, 3), slice(0, 1)))
    out = processor()(photo(), masks=[box_mask(0, 14, 0, 16)])
    np.testing.assert_array_equal(out["bool_masked_pos"][0], patch_rows_and_columns(slice(0, 2), slice(0, 1)))


@pytest.mark.parametrize("box", [(0, 15, 0, 16), (10, 31, 20, 45), (5, 40, 30, 33), (47, 48, 0, 64)])
def test_boxes_match_the_reference_at_crop_pct_1(box):
    mask = box_mask(*box)
    out = processor()(photo(), masks=[mask])
    np.testing.assert_array_equal(out["bool_masked_pos"][0], reference_patch_mask(mask, 42, 32, left=5, top=0))


@pytest.mark.parametrize("box", [(0, 12, 0, 64), (10, 31, 20, 45), (20, 28, 30, 38)])
def test_boxes_match_the_reference_at_crop_pct_0875(box):
    """Shorter side int(32 / 0.875) = 36, longer int(36 * 64 / 48) = 48; crop left round(16 / 2) = 8, top
    round(4 / 2) = 2. Input rows 0-11 cover resized rows 0-9 (x 3 / 4), crop rows 0-6: patch row 0 only plus
    patch row 1 at 3 / 4 of its rows: masked."""
    mask = box_mask(*box)
    out = processor(crop_pct=0.875)(photo(), masks=[mask])
    np.testing.assert_array_equal(out["bool_masked_pos"][0], reference_patch_mask(mask, 48, 36, left=8, top=2))
    if box == (0, 12, 0, 64):
        np.testing.assert_array_equal(out["bool_masked_pos"][0], patch_rows_and_columns(slice(0, 2), slice(None)))


def test_without_resize_the_mask_is_only_cropped():
    """do_resize=False on a 40 x 40 image: crop left = top = 4. Input rows 4-9 are crop rows 0-5: patch row 0
    fully masked, patch row 1 (crop rows 4-7) exactly half: masked; patch row 2 not."""
    out = processor(do_resize=False)(photo(40, 40), masks=[box_mask(4, 10, 0, 40, 40, 40)])
    np.testing.assert_array_equal(out["bool_masked_pos"][0], patch_rows_and_columns(slice(0, 2), slice(None)))


# ---------------------------------------------------------------------------------------------- mask kinds
def test_a_mask_image_with_alpha_gives_the_array_form():
    """Colour marks the mask; alpha, 0 over part of the masked box and 255 elsewhere, is ignored."""
    mask = box_mask(10, 31, 20, 45)
    rgba = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[mask, 0] = 200
    rgba[:, :, 3] = 255
    rgba[10:20, 20:30, 3] = 0
    arrays = processor()([photo()] * 4, masks=[mask, mask.astype(np.uint8), torch.from_numpy(mask), mask])
    from_image = processor()(photo(), masks=Image.fromarray(rgba, "RGBA"))
    expected = reference_patch_mask(mask, 42, 32, left=5, top=0)
    for patch_mask in arrays["bool_masked_pos"] + from_image["bool_masked_pos"]:
        np.testing.assert_array_equal(patch_mask, expected)


def test_return_tensors_stacks_bool_masks_as_the_drawn_ones():
    masks = np.stack([box_mask(0, 15, 0, 16), box_mask(10, 31, 20, 45)])
    ours = processor()([photo(seed=0), photo(seed=1)], masks=masks, return_tensors="pt")
    drawn = processor()([photo(seed=0), photo(seed=1)], return_bool_masked_pos=True, return_tensors="pt")
    assert ours["bool_masked_pos"].shape == drawn["bool_masked_pos"].shape == (2, 8, 8)
    assert ours["bool_masked_pos"].dtype == drawn["bool_masked_pos"].dtype == torch.bool
    torch.testing.assert_close(ours["pixel_values"], drawn["pixel_values"])


def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_the_training_evaluation_rows_give_the_same_masks_and_pixels(crop_pct):
    image, mask = np.asarray(photo()), box_mask(10, 31, 20, 45)
    user = processor(crop_pct=crop_pct, mask_strategy="user")
    row = {"image": png(image), "mask": png(mask.astype(np.uint8) * 255)}
    transformed, error = SimMIMTransform(user, train=False, mask_column="mask", keep_columns=()).transform_row(row)
    out = user(Image.fromarray(image), masks=[mask])
    assert error is None
    np.testing.assert_array_equal(out["bool_masked_pos"][0], transformed["bool_masked_pos"])
    np.testing.assert_allclose(out["pixel_values"][0], transformed["pixel_values"], atol=1e-6)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call, message",
    [
        (dict(masks=[box_mask(0, 1, 0, 1)] * 2), r"masks holds 2 mask\(s\) for 1 image\(s\)"),
        (dict(masks=[np.zeros((WIDTH, HEIGHT), bool)]), r"masks\[0\] is 48x64 px but images\[0\] is 64x48 px"),
        (dict(masks=[np.zeros((HEIGHT, WIDTH), np.float32)]), r"masks\[0\] holds float32 values.*bools or 0/1"),
        (dict(masks=[np.full((HEIGHT, WIDTH), 255)]), r"masks\[0\] holds int64 values in \[255, 255\]"),
        (dict(masks=["mask.png"]), r"masks\[0\] is a str: give a mask image"),
        (dict(masks=[box_mask(0, 1, 0, 1)], return_bool_masked_pos=True), "pass masks alone"),
        (dict(masks=[box_mask(0, 1, 0, 1)], mask_seed=0), "mask_seed=0 seeds drawn masks.*drop mask_seed"),
        (dict(masks=[box_mask(0, 1, 0, 1)], do_center_crop=False), r"images\[0\] becomes 42 x 32.*center_crop"),
        (dict(masks=[box_mask(0, 1, 0, 1)], do_pad=True), "is padded.*without padding"),
    ],
)
def test_bad_masks_are_refused_by_name_before_any_resize(call, message, monkeypatch):
    p = processor()
    monkeypatch.setattr(p, "resize_crop_normalize", lambda *args, **kwargs: pytest.fail("resized before the check"))
    with pytest.raises(ValueError, match=message):
        p(photo(), **call)


def test_a_square_at_the_model_size_needs_no_crop():
    mask = box_mask(0, 16, 0, 8, 32, 32)
    out = processor()(photo(32, 32), masks=[mask], do_center_crop=False)
    np.testing.assert_array_equal(out["bool_masked_pos"][0], patch_rows_and_columns(slice(0, 4), slice(0, 2)))


# ---------------------------------------------------------------------------------------------- saving, model
def test_masks_are_per_call_and_never_saved(tmp_path):
    used, fresh = processor(), processor()
    first = used(photo(), masks=[box_mask(0, 15, 0, 16)])["bool_masked_pos"][0]
    used.save_pretrained(tmp_path / "used")
    fresh.save_pretrained(tmp_path / "fresh")
    saved = json.loads((tmp_path / "used" / "preprocessor_config.json").read_text())
    assert saved == json.loads((tmp_path / "fresh" / "preprocessor_config.json").read_text())
    assert "masks" not in saved and saved["image_size"] == 32
    reloaded = SimMIMImageProcessor.from_pretrained(tmp_path / "used")
    np.testing.assert_array_equal(reloaded(photo(), masks=[box_mask(0, 15, 0, 16)])["bool_masked_pos"][0], first)
    with pytest.raises(ValueError, match=r"masks are given per call.*processor\(images, masks=...\)"):
        processor(masks=[box_mask(0, 1, 0, 1)])


def test_the_model_takes_the_processor_output_with_user_masks():
    config = SimMIMConfig(**tiny_vit())
    model = SimMIMForMaskedImageModeling(config).eval()
    p = SimMIMImageProcessor.from_model_config(config)
    masks = [box_mask(0, 15, 0, 16), box_mask(10, 31, 20, 45)]
    with torch.no_grad():
        loss = model(**p([photo(seed=0), photo(seed=1)], masks=masks, return_tensors="pt")).loss
    assert torch.isfinite(loss) and loss > 0
