"""The inpainting pipeline: transformers' `pipeline("image-inpainting", ...)`, visible pixels kept bit for bit, the
mask snapped to the patch grid (any overlap), images of any size, and checkpoints that carry the pipeline's code for
`trust_remote_code` where hf_simmim cannot be imported."""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.pipelines import get_supported_tasks

from conftest import perturb_parameters_, tiny_swin, tiny_vit
from hf_simmim import (
    INPAINTING_TASK,
    InpaintingInputError,
    SimMIMConfig,
    SimMIMForMaskedImageModeling,
    SimMIMImageProcessor,
    SimMIMInpaintingPipeline,
    SimMIMMaskGenerator,
)
from hf_simmim.models.pipeline_simmim import patches_to_fill
from hf_simmim.reporting.pictures import denormalize


def save_checkpoint(folder, **config_fields):
    torch.manual_seed(0)
    model = perturb_parameters_(SimMIMForMaskedImageModeling(SimMIMConfig(**config_fields)), std=0.05)
    model.save_pretrained(folder)
    SimMIMImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("vit"), **tiny_vit())


@pytest.fixture(scope="module")
def inpainter(vit_checkpoint):
    return pipeline(INPAINTING_TASK, model=vit_checkpoint)


def random_image(height, width, channels=3, seed=0, dtype=np.uint8):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the patch grid
def overlapped_patches(length, side, patch_size, pixel):
    """Reference: the patches whose span [r P length / side, (r + 1) P length / side) meets [pixel, pixel + 1)."""
    spans = (Fraction(r * patch_size * length, side) for r in range(side // patch_size + 1))
    edges = list(spans)
    return {r for r in range(side // patch_size) if edges[r] < pixel + 1 and edges[r + 1] > pixel}


def test_a_pixel_on_a_patch_border_masks_both_patches():
    # 9 px resized to 8 with patch 4: patch 0 covers [0, 4.5), patch 1 [4.5, 9); pixel 4 ([4, 5)) overlaps both
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 0] = True
    np.testing.assert_array_equal(patches_to_fill(mask, 8, 4), [[True, False], [True, False]])
    mask[:] = False
    mask[3, 5] = True  # rows [3, 4) inside patch 0; columns [5, 6) inside patch 1
    np.testing.assert_array_equal(patches_to_fill(mask, 8, 4), [[False, True], [False, False]])


@pytest.mark.parametrize("height, width", [(32, 32), (37, 45), (20, 13), (100, 64)])
def test_patches_to_fill_are_exactly_those_any_pixel_to_fill_overlaps(height, width):
    mask = np.random.default_rng(height * width).random((height, width)) < 0.01
    mask[height // 2, width // 3] = True
    expected = np.zeros((8, 8), dtype=bool)
    for y, x in zip(*np.nonzero(mask)):
        for r in overlapped_patches(height, 32, 4, y):
            for c in overlapped_patches(width, 32, 4, x):
                expected[r, c] = True
    np.testing.assert_array_equal(patches_to_fill(mask, 32, 4), expected)


def test_a_patch_aligned_mask_at_the_models_size_is_kept_as_it_is():
    generator = SimMIMMaskGenerator(32, 8, 4, 0.6, seed=0)
    grid = generator()
    np.testing.assert_array_equal(patches_to_fill(grid.repeat(4, 0).repeat(4, 1), 32, 4), grid)


# ---------------------------------------------------------------------------------------------- the pipeline
def test_the_task_is_registered_with_transformers(inpainter):
    assert INPAINTING_TASK in get_supported_tasks()
    assert isinstance(inpainter, SimMIMInpaintingPipeline)


def test_filled_pixels_are_the_models_reconstruction_of_the_masked_patches(inpainter):
    """At the model's size nothing is resized: the filled pixels are the reconstruction the model gives for the image
    with the patches the mask touches masked, un-normalised as the reconstruction pictures do."""
    image = random_image(32, 32, seed=1)
    to_fill = np.zeros((32, 32), dtype=bool)
    to_fill[5:11, 9:30] = True  # not patch-aligned: patch rows 1-2, columns 2-7
    patch_grid = np.zeros((1, 8, 8), dtype=bool)
    patch_grid[0, 1:3, 2:8] = True
    processor = inpainter.image_processor
    with torch.no_grad():
        reconstruction = inpainter.model(
            processor(image, return_tensors="pt")["pixel_values"], bool_masked_pos=torch.from_numpy(patch_grid)
        ).reconstruction
    expected = denormalize(reconstruction, processor.image_mean, processor.image_std)[0]
    filled = inpainter(image, mask=to_fill)
    np.testing.assert_array_equal(filled[~to_fill], image[~to_fill])
    difference = np.abs(filled[to_fill].astype(int) - expected[to_fill].astype(int))
    assert difference.max() <= 1  # rounding of the un-normalisation


@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_what_lies_under_the_mask_never_reaches_the_model(backbone, tmp_path):
    """Two images that differ only under the mask give the same result, also when resizing spreads pixels."""
    fields = tiny_vit() if backbone == "vit" else tiny_swin()
    inpainter = pipeline(INPAINTING_TASK, model=save_checkpoint(tmp_path / backbone, **fields))
    image = random_image(41, 53, seed=2)
    to_fill = np.zeros((41, 53), dtype=bool)
    to_fill[6:19, 14:40] = True  # edges within a pixel of patch borders: resampling reaches the next patch
    other = image.copy()
    other[to_fill] = random_image(41, 53, seed=3)[to_fill]
    first, second = inpainter(image, mask=to_fill), inpainter(other, mask=to_fill)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[~to_fill], image[~to_fill])
    assert (first[to_fill] != image[to_fill]).any()


def save_mask_image(tmp_path, to_fill):
    path = tmp_path / "mask.png"
    Image.fromarray(np.where(to_fill, 255, 0).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize(
    "kind", ["rgb", "grey", "16-bit grey", "array", "2-D array", "path", "larger than the model"]
)
def test_visible_pixels_stay_bit_exact_for_every_kind_of_image(kind, inpainter, tmp_path):
    height, width = (90, 120) if kind == "larger than the model" else (37, 45)
    rgb = random_image(height, width, seed=4)
    image = {
        "rgb": Image.fromarray(rgb),
        "grey": Image.fromarray(rgb).convert("L"),
        "16-bit grey": Image.fromarray(random_image(height, width, 1, seed=5, dtype=np.uint16)),
        "array": rgb,
        "2-D array": rgb[..., 0],
        "path": str(tmp_path / "image.png"),
        "larger than the model": Image.fromarray(rgb),
    }[kind]
    Image.fromarray(rgb).save(tmp_path / "image.png")
    to_fill = np.zeros((height, width), dtype=bool)
    to_fill[3:20, 30:44] = True
    masks = {"rgb": (30, 3, 44, 20), "grey": to_fill.astype(np.uint8), "path": save_mask_image(tmp_path, to_fill)}
    filled = inpainter(image, mask=masks.get(kind, to_fill))
    opened = Image.open(image) if kind == "path" else image
    if isinstance(opened, Image.Image):  # a PIL image (or path) in, a PIL image of its mode out
        assert isinstance(filled, Image.Image) and filled.mode == opened.mode
        filled = np.asarray(filled)
    else:
        assert isinstance(filled, np.ndarray)
    original = np.asarray(opened)
    assert filled.shape == original.shape and filled.dtype == original.dtype
    np.testing.assert_array_equal(filled[~to_fill], original[~to_fill])
    assert (filled[to_fill] != original[to_fill]).mean() > 0.5


@pytest.mark.parametrize("red_bias", [None, 5.0])
def test_a_grey_image_is_filled_with_the_grey_of_the_rgb_prediction(inpainter, red_bias):
    if red_bias is not None:  # red predictions far above 255: clipped per channel before the grey, as in RGB
        inpainter = copy.deepcopy(inpainter)
        with torch.no_grad():
            decoder = inpainter.model.decoder[0]
            decoder.bias[: decoder.bias.numel() // 3] = red_bias
    grey = Image.fromarray(random_image(32, 32, seed=6)).convert("L")
    to_fill = np.zeros((32, 32), dtype=bool)
    to_fill[8:24, 8:24] = True
    rgb_filled = np.asarray(inpainter(grey.convert("RGB"), mask=to_fill))
    grey_filled = np.asarray(inpainter(grey, mask=to_fill))
    as_pil_converts_it = np.asarray(Image.fromarray(rgb_filled).convert("L"))
    assert np.abs(grey_filled.astype(int) - as_pil_converts_it.astype(int))[to_fill].max() <= 1


def test_inputs_as_dicts_and_lists(inpainter):
    image = random_image(32, 40, seed=7)
    to_fill = np.zeros((32, 40), dtype=bool)
    to_fill[0:8, 0:8] = True
    single = inpainter(image, mask=to_fill)
    both = inpainter([{"image": image, "mask": to_fill}, {"image": image[..., 1], "mask": (0, 0, 8, 8)}])
    np.testing.assert_array_equal(both[0], single)
    assert both[1].shape == (32, 40)
    np.testing.assert_array_equal(inpainter([image], mask=to_fill)[0], single)
    with pytest.raises(InpaintingInputError, match="given twice"):
        inpainter({"image": image, "mask": to_fill}, mask=to_fill)
    with pytest.raises(InpaintingInputError, match="got the keys \\['image', 'masks'\\]"):
        inpainter({"image": image, "masks": to_fill})


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (random_image(20, 30), np.ones((30, 20), dtype=bool), "The mask is 20x30 .* but the image is 30x20"),
        (random_image(20, 30), np.zeros((20, 30), dtype=bool), "selects no pixel"),
        (random_image(20, 30), (0, 0, 31, 10), r"not inside the 30x20 image"),
        (random_image(20, 30), (5, 5, 5, 10), r"0 <= x0 < x1 <= 30"),
        (random_image(20, 30), (0.5, 0, 3, 3), "4 integers"),
        (random_image(20, 30), np.full((20, 30), 2), "bools or 0/1"),
        (random_image(20, 30), "no-such-mask.png", None),
        (Image.new("P", (30, 20)), (0, 0, 3, 3), "mode P: convert it"),
        (random_image(20, 30, 4), (0, 0, 3, 3), "4 channel"),
        (random_image(20, 30), None, "No mask"),
    ],
)
def test_unusable_images_and_masks_are_refused_naming_the_fix(inpainter, image, mask, message):
    if message is None:
        with pytest.raises(FileNotFoundError, match="no-such-mask.png"):
            inpainter(image, mask=mask)
        return
    with pytest.raises(InpaintingInputError, match=message):
        inpainter(image, mask=mask) if mask is not None else inpainter(image)


def test_models_that_do_not_predict_pixels_are_refused():
    from hf_simmim import SimMIMForImageClassification

    classifier = SimMIMForImageClassification(SimMIMConfig(**tiny_vit(), num_labels=3))
    with pytest.raises(TypeError, match="SimMIMForMaskedImageModeling"):
        SimMIMInpaintingPipeline(model=classifier)
    standardised = SimMIMForMaskedImageModeling(SimMIMConfig(**tiny_vit(), norm_target=True))
    with pytest.raises(ValueError, match="predicts standardised patches, not pixels"):
        SimMIMInpaintingPipeline(model=standardised)


# ---------------------------------------------------------------------------------------------- shared checkpoints
ISOLATED_RUN = textwrap.dedent(
    """
    import sys

    class NoHfSimmim:  # as if hf_simmim were not installed, whatever way it is (editable, wheel, PYTHONPATH)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_simmim":
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoHfSimmim())
    try:
        import hf_simmim
        sys.exit("hf_simmim could be imported")
    except ModuleNotFoundError:
        pass
    import numpy as np
    from transformers import pipeline

    image = np.load("image.npy")
    to_fill = np.load("mask.npy")
    for task in ("image-inpainting", None):  # the task named, or read from config.json's custom_pipelines
        inpainter = pipeline(task, model="checkpoint", trust_remote_code=True)
        np.save("filled.npy", inpainter(image, mask=to_fill))
    print(type(inpainter).__module__, type(inpainter.model).__module__, type(inpainter.image_processor).__module__)
    print(sorted(name for name in sys.modules if name.startswith("hf_simmim")))
    """
)


def test_a_checkpoint_saved_with_the_pipeline_runs_where_hf_simmim_is_not_installed(inpainter, tmp_path):
    inpainter.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["custom_pipelines"] == {
        INPAINTING_TASK: {
            "impl": "pipeline_simmim.SimMIMInpaintingPipeline",
            "pt": ["AutoModelForMaskedImageModeling"],
            "type": "image",
        }
    }
    assert (tmp_path / "saved" / "pipeline_simmim.py").is_file()
    work = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "saved", work / "checkpoint")
    image = random_image(30, 50, seed=8)
    to_fill = np.zeros((30, 50), dtype=bool)
    to_fill[4:16, 20:41] = True
    np.save(work / "image.npy", image)
    np.save(work / "mask.npy", to_fill)
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    # -I: no PYTHONPATH, no user site, not the current folder on sys.path
    result = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_RUN], cwd=work, env=environment, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules, loaded = result.stdout.strip().splitlines()[-2:]
    assert modules.count("transformers_modules.checkpoint") == 3 and loaded == "[]"
    np.testing.assert_array_equal(np.load(work / "filled.npy"), inpainter(image, mask=to_fill))


def test_with_hf_simmim_installed_a_saved_pipeline_loads_by_its_class(inpainter, tmp_path):
    """transformers asks for trust_remote_code for a task config.json names, even where it is registered; naming the
    class (as `hf-simmim inpaint` does) runs the installed code."""
    inpainter.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline(INPAINTING_TASK, model=str(tmp_path / "saved"))
    installed = pipeline(INPAINTING_TASK, model=str(tmp_path / "saved"), pipeline_class=SimMIMInpaintingPipeline)
    assert type(installed) is SimMIMInpaintingPipeline
