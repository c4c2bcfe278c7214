"""Reconstruction grids, loss curves and `hf-simmim reconstruct`, drawn with PIL."""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMImageProcessor
from hf_simmim.models.image_transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from hf_simmim.reporting.pictures import (
    COLUMNS,
    MASK_GREY,
    RECONSTRUCTION_CAPTION,
    denormalize,
    loss_curve,
    reconstruct,
    reconstruct_images,
    reconstruction_grid,
    reconstruction_panels,
)

MEAN = np.array(IMAGENET_DEFAULT_MEAN).reshape(1, 3, 1, 1)
STD = np.array(IMAGENET_DEFAULT_STD).reshape(1, 3, 1, 1)


def normalised(rgb_uint8):
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float tensor."""
    array = rgb_uint8.transpose(0, 3, 1, 2) / 255.0
    return torch.tensor((array - MEAN) / STD, dtype=torch.float32)


def test_denormalize_inverts_the_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(denormalize(normalised(rgb)), rgb)


def test_panels_grey_out_masked_patches_and_paste_the_reconstruction_there():
    original = np.full((1, 8, 8, 3), 200, dtype=np.uint8)
    predicted = np.full((1, 8, 8, 3), 30, dtype=np.uint8)
    mask = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)  # patch 4: top-left and bottom-right masked
    panels = reconstruction_panels(normalised(original), mask, normalised(predicted), patch_size=4)
    first, masked_input, reconstruction, pasted = (p[0, :, :, 0] for p in panels)
    assert (first == 200).all() and (reconstruction == 30).all()
    pixel_mask = np.kron(mask[0].numpy(), np.ones((4, 4), dtype=bool))
    assert (masked_input[pixel_mask] == MASK_GREY).all() and (masked_input[~pixel_mask] == 200).all()
    assert (pasted[pixel_mask] == 30).all() and (pasted[~pixel_mask] == 200).all()
    flat = mask.reshape(1, 4)  # (B, num_patches) masks work too
    np.testing.assert_array_equal(
        reconstruction_panels(normalised(original), flat, normalised(predicted), 4)[3], panels[3]
    )


def test_grid_has_a_row_per_image_and_the_four_columns():
    rgb = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, :4] = True
    grid = reconstruction_grid(normalised(rgb), mask, normalised(rgb), patch_size=4, title="step 10")
    assert len(COLUMNS) == 4
    assert grid.width >= 4 * 96 and grid.height >= 3 * 96  # 32 px images enlarged 3x
    assert grid.height < 3 * 96 + 3 * 4 + 60
    # the first image, enlarged 3x pixel by pixel, is in the first column of the first row
    array = np.asarray(grid)
    top = grid.height - 3 * (96 + 4)
    first_tile = array[top : top + 96]
    found = any(
        np.array_equal(first_tile[:, x : x + 96], np.kron(rgb[0], np.ones((3, 3, 1), dtype=np.uint8)))
        for x in range(0, 40)
    )
    assert found
    with pytest.raises(ValueError, match="patch_size=8"):
        reconstruction_grid(normalised(rgb), mask, normalised(rgb), patch_size=8)


def test_grid_caption_says_that_only_masked_patches_are_trained():
    assert "only masked patches are trained" in RECONSTRUCTION_CAPTION
    rgb = np.random.default_rng(2).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:6] = True
    arguments = (normalised(rgb), mask, normalised(rgb))
    captioned = np.asarray(reconstruction_grid(*arguments, patch_size=4, title="step 3"))
    bare = np.asarray(reconstruction_grid(*arguments, patch_size=4, title="step 3", caption=None))
    # The caption is one more line of text under the title; the rest of the picture moves down unchanged.
    line = captioned.shape[0] - bare.shape[0]
    assert 8 <= line <= 30
    width = bare.shape[1]
    np.testing.assert_array_equal(captioned[:line, :width], bare[:line])
    np.testing.assert_array_equal(captioned[2 * line :, :width], bare[line:])
    ink_columns = np.nonzero((captioned[line : 2 * line] < 128).any(axis=(0, 2)))[0]
    assert ink_columns.size and ink_columns.max() - ink_columns.min() > 250  # a line of text that long


def test_loss_curve_draws_a_falling_line_and_the_eval_points():
    history = [{"step": s, "loss": 1.0 - 0.05 * s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.55}]
    image = np.asarray(loss_curve(history)).astype(int)
    blue = (abs(image[..., 0] - 31) < 10) & (abs(image[..., 1] - 119) < 10) & (abs(image[..., 2] - 180) < 10)
    orange = (abs(image[..., 0] - 255) < 10) & (abs(image[..., 1] - 127) < 10) & (abs(image[..., 2] - 14) < 10)
    ys, xs = np.nonzero(blue)
    assert blue.sum() > 100 and orange.sum() > 20
    left, right = ys[xs < np.percentile(xs, 20)].mean(), ys[xs > np.percentile(xs, 80)].mean()
    assert left < right  # y grows downwards: the loss falls from left to right
    with pytest.raises(ValueError, match="no 'loss'"):
        loss_curve([{"step": 1, "learning_rate": 0.1}])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("vit-tiny-test")
    SimMIMForMaskedImageModeling(config).save_pretrained(str(folder))
    SimMIMImageProcessor.from_model_config(config).save_pretrained(str(folder))
    return folder


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, size in enumerate([(32, 32), (64, 48)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(
            path
        )
        paths.append(str(path))
    return paths


def test_reconstruct_images_writes_the_same_grid_for_the_same_seed(checkpoint, images, tmp_path):
    first = reconstruct_images(str(checkpoint), images, str(tmp_path / "a" / "grid.png"), mask_seed=0)
    second = reconstruct_images(str(checkpoint), images, str(tmp_path / "b.png"), mask_seed=0)
    other = reconstruct_images(str(checkpoint), images, str(tmp_path / "c.png"), mask_seed=1)
    assert first == str(tmp_path / "a" / "grid.png")
    a, b, c = (np.asarray(Image.open(p)) for p in (first, second, other))
    assert a.shape[0] >= 2 * 96
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        reconstruct_images(str(checkpoint), [str(tmp_path / "missing.png")], str(tmp_path / "d.png"))


def test_reconstruct_matches_the_model_forward(checkpoint):
    model = SimMIMForMaskedImageModeling.from_pretrained(str(checkpoint))
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6] = True
    model.train()
    out = reconstruct(model, pixels, mask)
    assert model.training  # restored
    model.eval()
    torch.testing.assert_close(out, model(pixel_values=pixels, bool_masked_pos=mask).reconstruction)


def test_cli_reconstruct(checkpoint, images, tmp_path, capsys):
    from hf_simmim.cli import main

    output = tmp_path / "cli.png"
    assert main(["reconstruct", str(checkpoint), *images, "--output", str(output)]) == 0
    assert Image.open(output).format == "PNG"
    assert str(output) in capsys.readouterr().out


def test_images_of_any_channel_count_are_shown_as_grey_or_a_chosen_rgb_triple():
    from hf_simmim.reporting.pictures import display_view

    values = np.zeros((1, 5, 2, 2), dtype=np.float32)
    values[0, :, 0, 0] = [0.0, 0.25, 0.5, 0.75, 1.0]
    grey = denormalize(values[:, 3:4], [0.0], [1.0])  # one channel: 0.75 at the top left, 0 elsewhere
    assert grey.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(grey[0, 0, 0], [191] * 3)
    np.testing.assert_array_equal(grey[0, 1, 1], [0] * 3)
    np.testing.assert_array_equal(denormalize(values, [0.0] * 5, [1.0] * 5, (4, 2, 1))[0, 0, 0], [255, 128, 64])
    np.testing.assert_array_equal(denormalize(values, [0.0] * 5, [1.0] * 5, (3,))[0, 0, 0], [191] * 3)
    # stretched: each shown channel from its 1st to 99th percentile over the batch to 0..255
    ramp = np.arange(101, dtype=np.float32).reshape(1, 1, 1, 101) * 0.001 + 0.2
    shown = denormalize(ramp, [0.0], [1.0], stretch=True)[0, 0, :, 0]
    assert shown[1] == 0 and shown[99] == 255 and shown[50] in (127, 128)
    with pytest.raises(ValueError, match="--display_channels 5 1 0: .* each in 0..4"):
        display_view(5, (5, 1, 0))
    assert display_view(1) == (0, 0, 0) and display_view(13) == (0, 1, 2)
