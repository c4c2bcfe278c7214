"""Mask images are read by one rule in training (user masks) and inpainting: a pixel is masked where any colour
band is nonzero; an alpha band is left out, and a palette image counts by its colours (hand-made images)."""

import io

import numpy as np
import pytest
from PIL import Image

from hf_simmim.data.user_masks import read_user_mask
from hf_simmim.models.pipeline_simmim import pixel_mask

SQUARE = np.zeros((16, 16), dtype=bool)
SQUARE[4:8, 4:8] = True  # 16 of 256 pixels


def mask_images():
    """The same 4x4 white square on black, in the modes masks come in; each keep area is opaque."""
    grey = Image.fromarray(np.where(SQUARE, 255, 0).astype(np.uint8))
    rgba = grey.convert("RGBA")  # alpha 255 everywhere
    la = grey.convert("LA")
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putdata([1 if masked else 0 for masked in SQUARE.ravel()])  # index 0 is black
    return {"L": grey, "RGBA": rgba, "LA": la, "P": palette, "1": grey.convert("1")}


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "1"])
def test_training_and_inpainting_read_a_mask_image_alike(mode):
    image = mask_images()[mode]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert np.array_equal(read_user_mask({"bytes": buffer.getvalue(), "path": None}) == 1.0, SQUARE)
    assert np.array_equal(pixel_mask(image, 16, 16), SQUARE)


def test_a_palette_mask_counts_by_colour_not_index():
    palette = Image.new("P", (16, 16))
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white, index 1 black
    palette.putdata([0 if masked else 1 for masked in SQUARE.ravel()])
    assert np.array_equal(pixel_mask(palette, 16, 16), SQUARE)
