"""User masks (`mask_strategy="user"`): a column of the dataset holding, for each image, a mask of the image's size:
a mask image (PNG, ...) or an HW array, a pixel being masked where it is nonzero (in any channel). Read here,
cropped and flipped with the image by `AugmentationPreset.augment`, and snapped to the patch grid by
`models.masking.snap_mask_to_patches` (a patch is masked when at least half of its pixels are)."""

import numpy as np
from PIL import Image

from ..models.masking import mask_from_image
from .image_ops import decoding, open_image
from .pixels import cell_source, is_npy, read_pixels, reads_with_tifffile


def check_user_masks(mask_strategy, mask_column):
    """A mask column goes with `mask_strategy="user"`, and that strategy with a mask column."""
    if mask_column and mask_strategy != "user":
        raise ValueError(
            f"A mask column ({mask_column!r}) gives the masks of mask_strategy='user', but the model's mask_strategy "
            f"is {mask_strategy!r}: set mask_strategy='user' (run_mim.py: --mask_column alone does), or drop the "
            "mask column."
        )
    if mask_strategy == "user" and not mask_column:
        raise ValueError(
            "mask_strategy='user' takes each image's mask from a column of the dataset: name it "
            "(run_mim.py --mask_column NAME; SimMIMTransform(mask_column=...))."
        )


def read_user_mask(cell):
    """A mask cell -> float32 `(H, W)` array, 1.0 where any channel is nonzero, else 0.0; a mask image by
    `mask_from_image` (its alpha band left out). A mask that cannot be decoded raises `UndecodableImage`."""
    source = cell_source(cell)
    is_image_file = source is not None and not is_npy(source) and not reads_with_tifffile(source)
    if not (is_image_file or isinstance(cell, Image.Image)):
        return (read_pixels(cell) != 0).any(axis=0).astype(np.float32)
    image = open_image(cell)
    with decoding():
        return mask_from_image(image).astype(np.float32)


def check_mask_size(mask, width, height):
    """Refuse a mask (an HW array, or None: no mask) whose size is not its image's."""
    if mask is not None and mask.shape != (height, width):
        raise ValueError(
            f"a {mask.shape[1]}x{mask.shape[0]} px user mask belongs to a {width}x{height} px image: a mask must "
            "have its image's size."
        )
