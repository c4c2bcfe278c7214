"""Inpainting with a SimMIM model: `SimMIMInpaintingPipeline`, a transformers pipeline for the task `INPAINTING_TASK`.

    import hf_simmim  # registers the task with transformers' PIPELINE_REGISTRY
    from transformers import pipeline

    inpainter = pipeline("image-inpainting", model="path/to/checkpoint")
    filled = inpainter("photo.png", mask="mask.png")        # nonzero = fill (black = keep)
    filled = inpainter(image, mask=(40, 30, 90, 70))         # a box x0, y0, x1, y1 (x1, y1 excluded, as PIL's crop)
    filled = inpainter(image, mask=bool_array)               # (height, width), True = fill

What it does to an image of any size (height H, width W) and a model of `image_size` S and `patch_size` P:

1. The pixels to fill are replaced by the value the image processor normalises to 0 (its `image_mean`), so nothing
   under the mask reaches the model, not even through the resampling kernel.
2. The whole image is resized to S x S (its aspect ratio is not kept, as the random-resized crops of pretraining
   stretch images too; no tiling) and normalised by the checkpoint's image processor.
3. The mask is snapped to the model's patch grid: a patch is masked when ANY pixel to fill overlaps it. Patch r
   covers the original rows [r * P * H / S, (r + 1) * P * H / S) (columns likewise) and pixel y the rows [y, y + 1),
   so every pixel to fill lies wholly inside masked patches: none is predicted from a visible patch, whose
   reconstruction is not trained. (Training's user masks, `masking.snap_mask_to_patches`, mask a patch when at least
   half of it is masked instead: there the mask ratio matters, here that every pixel to fill is predicted.)
4. The model predicts the masked patches; the visible patches keep their input pixels. That S x S picture is
   un-normalised, resized back to H x W, and written into the pixels to fill only (clipped and rounded for
   integer images). Every other pixel of the result is the input's, bit for bit.

Inputs: a PIL image (modes RGB, L, I;16, I, F), a path to one, or a NumPy array (H, W) or (H, W, channels), its values
in the units the image processor rescales (0-255 for 8-bit images). A grey image with a 3-channel model is shown to
the model as RGB and its prediction turned back to grey with ITU-R 601 luma, as PIL's "L" conversion. The result has
the input's kind, size, mode, shape and dtype. One image at a time (`batch_size` 1).

Sharing: `inpainter.save_pretrained(folder)` (or `push_to_hub`) writes the checkpoint with this file and names the
pipeline in its config.json (`custom_pipelines`), so `pipeline("image-inpainting", model=folder,
trust_remote_code=True)` runs it where hf_simmim is not installed. For a task config.json names, transformers asks for
`trust_remote_code=True` even where hf_simmim is installed; `pipeline_class=SimMIMInpaintingPipeline` runs the
installed code instead (`hf-simmim inpaint` does).

Relative imports only: a checkpoint saved with this pipeline carries this file.
"""

import numbers
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.pipelines import Pipeline

from .image_processing_simmim import SimMIMImageProcessor
from .image_transforms import map_channels
from .masking import bool_mask

INPAINTING_TASK = "image-inpainting"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # RGB -> grey, as PIL's convert("L")
IMAGE_MODES = ("RGB", "L", "I;16", "I", "F")


class InpaintingInputError(ValueError):
    """An image or mask the pipeline cannot use (a mode or channel count it cannot fill; a mask of another size, with
    nothing to fill, a box outside the image, values other than 0/1)."""


# ---------------------------------------------------------------------------------------------- images and masks
def open_image_file(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}.")
    image = Image.open(path)
    return ImageOps.exif_transpose(image)


def image_pixels(image):
    """`(pixels, form)`: the image as an (H, W, channels) array, and what to return it as (a PIL mode, or the
    number of dimensions of an array)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image)
    if isinstance(image, Image.Image):
        if image.mode not in IMAGE_MODES:
            raise InpaintingInputError(
                f"Cannot inpaint a PIL image of mode {image.mode}: convert it to one of {IMAGE_MODES} first, e.g. "
                "image.convert('RGB') (an alpha channel or palette is not kept)."
            )
        pixels = np.asarray(image)
        return (pixels[..., None] if pixels.ndim == 2 else pixels), image.mode
    if isinstance(image, np.ndarray) and image.ndim in (2, 3) and image.size:
        return (image[..., None] if image.ndim == 2 else image), image.ndim
    raise TypeError(
        "The image must be a PIL image, a path to one, or a NumPy array of shape (height, width) or (height, width, "
        f"channels); got {type(image).__name__}{getattr(image, 'shape', '')}."
    )


def in_input_form(pixels, form):
    """(H, W, channels) pixels as `image_pixels` got them: a PIL image of that mode, or an array of that many dims."""
    if isinstance(form, str):
        return Image.fromarray(pixels if form == "RGB" else pixels[..., 0])
    return pixels[..., 0] if form == 2 else pixels


def box_mask(box, height, width):
    """A box `(x0, y0, x1, y1)` in pixels, x1 and y1 excluded (PIL's crop box) -> a bool (height, width) mask."""
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box):
        raise InpaintingInputError(f"A mask box holds 4 integers (x0, y0, x1, y1); got {tuple(box)}.")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InpaintingInputError(
            f"The mask box (x0, y0, x1, y1) = {(x0, y0, x1, y1)} is not inside the {width}x{height} image: it needs "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (x1, y1 excluded)."
        )
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def pixel_mask(mask, height, width):
    """A mask image (or its path; a pixel nonzero in any colour band = fill, alpha left out, as training's user masks),
    a box `(x0, y0, x1, y1)`, or a bool or 0/1 array (True = fill) -> a bool (height, width) array of the pixels to
    fill (`masking.bool_mask`)."""
    if isinstance(mask, (str, os.PathLike)):
        mask = open_image_file(mask)
    if isinstance(mask, (tuple, list)) and len(mask) == 4 and all(isinstance(v, numbers.Number) for v in mask):
        return checked_mask(box_mask(mask, height, width))
    try:
        mask = bool_mask(mask, "The mask (a mask image or its path, a box x0, y0, x1, y1, or an array)")
    except ValueError as error:
        raise InpaintingInputError(str(error)) from None
    if mask.shape != (height, width):
        raise InpaintingInputError(
            f"The mask is {mask.shape[1]}x{mask.shape[0]} (width x height) but the image "
            f"is {width}x{height}: give a mask of the image's size."
        )
    return checked_mask(mask)


def checked_mask(mask):
    if not mask.any():
        raise InpaintingInputError(
            "The mask selects no pixel to fill: a mask image fills its nonzero pixels, an array its True / 1 "
            "entries, a box its inside."
        )
    return mask


def patch_pixel_ranges(length, side, patch_size):
    """`(starts, stops)`: along an axis of `length` pixels resized to `side`, the pixels [start, stop) whose area
    [y, y + 1) overlaps each model patch, which covers [r * patch_size * length / side, (r + 1) * ...)."""
    edges = np.arange(side // patch_size + 1) * patch_size * length
    return edges[:-1] // side, -(-edges[1:] // side)  # floor of each patch's start, ceil of its end


def patches_to_fill(mask, side, patch_size):
    """A bool (H, W) pixel mask -> the bool (side / patch_size,) * 2 patch mask of a model of input `side`: a patch is
    masked when any masked pixel overlaps it once the image is resized to side x side."""
    row_starts, row_stops = patch_pixel_ranges(mask.shape[0], side, patch_size)
    column_starts, column_stops = patch_pixel_ranges(mask.shape[1], side, patch_size)
    by_column = np.stack([mask[:, a:b].any(axis=1) for a, b in zip(column_starts, column_stops)], axis=1)
    return np.stack([by_column[a:b].any(axis=0) for a, b in zip(row_starts, row_stops)])


def resize_channels(pixels, width, height, resample):
    """A (C, H, W) array -> float32 (C, height, width), each channel resized by PIL as a 32-bit float image."""
    return map_channels(pixels.astype(np.float32), lambda channel: channel.resize((width, height), resample))


def cast_like(values, dtype):
    """Float pixel values -> `dtype`: integers rounded (half up) and clipped to the dtype's range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.floor(values + 0.5), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# ---------------------------------------------------------------------------------------------- the pipeline
class SimMIMInpaintingPipeline(Pipeline):
    """Fill the masked pixels of an image with a SimMIM model's prediction (see the module docstring for how).

    `pipeline("image-inpainting", model=CHECKPOINT)` after `import hf_simmim`; call it as `inpainter(image,
    mask=MASK)` or `inpainter({"image": image, "mask": MASK})` (lists of either too). MASK: a mask image or its path
    (nonzero = fill), a box `(x0, y0, x1, y1)`, or a bool / 0-1 array of the image's size. Returns the filled
    image in the input's kind (a PIL image for a PIL image or path, else an array), one per input.
    """

    _load_processor = False
    _load_image_processor = None  # the checkpoint's processor when it has one, else one built from its config
    _load_feature_extractor = False
    _load_tokenizer = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.model).__name__ != "SimMIMForMaskedImageModeling":
            raise TypeError(
                f"{INPAINTING_TASK} needs a SimMIM pretraining model (SimMIMForMaskedImageModeling), which predicts "
                f"masked pixels; got {type(self.model).__name__}. Convert a transformers ViT/Swin masked-image-"
                "modeling checkpoint with `hf-simmim convert transformers`."
            )
        if getattr(self.model.config, "norm_target", None) not in (None, False):
            raise ValueError(
                f"This model was trained with norm_target={self.model.config.norm_target!r}: it predicts standardised "
                "patches, not pixels, so its prediction cannot fill an image. Use a model pretrained on the pixels "
                "(norm_target None, the paper's setting)."
            )
        if self.image_processor is None:
            self.image_processor = SimMIMImageProcessor.from_model_config(self.model.config)

    def __call__(self, inputs, **kwargs):
        """`inputs`: an image (PIL, path, or array), a dict `{"image": ..., "mask": ...}`, or a list of them;
        `mask`: the mask of every image that does not bring its own. Returns the filled image(s)."""
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(self, mask=None):
        return ({} if mask is None else {"mask": mask}), {}, {}

    def preprocess(self, inputs, mask=None):
        if isinstance(inputs, dict):
            unknown = sorted(set(inputs) - {"image", "mask"})
            if unknown or "image" not in inputs:
                raise InpaintingInputError(
                    f"An input dict holds 'image' and optionally 'mask'; got the keys {sorted(inputs)}."
                )
            if "mask" in inputs and mask is not None:
                raise InpaintingInputError("The mask is given twice, in the input dict and as mask=: give one.")
            inputs, mask = inputs["image"], inputs.get("mask", mask)
        if mask is None:
            raise InpaintingInputError(
                "No mask: pass mask= (a mask image or its path, a box (x0, y0, x1, y1), or a bool array)."
            )
        original, form = image_pixels(inputs)
        to_fill = pixel_mask(mask, *original.shape[:2])
        config = self.model.config
        neutral = self._raw_values(np.zeros((config.num_channels, 1, 1)))[:, 0, 0]  # normalises to 0
        hidden = np.moveaxis(np.where(to_fill[..., None], neutral, self._model_channels(original)), -1, 0)
        side = config.image_size
        if hidden.shape[1:] != (side, side):
            hidden = resize_channels(hidden, side, side, self.image_processor.resample)
        pixel_values = self.image_processor(
            hidden.astype(np.float32), do_resize=False, do_center_crop=False, do_convert_rgb=False,
            input_data_format="channels_first", return_tensors="pt",
        )["pixel_values"]
        patch_mask = torch.from_numpy(patches_to_fill(to_fill, side, config.patch_size))[None]
        return {"pixel_values": pixel_values, "bool_masked_pos": patch_mask, "original": original,
                "to_fill": to_fill, "form": form}

    def _forward(self, model_inputs):
        outputs = self.model(
            pixel_values=model_inputs["pixel_values"].to(self.model.dtype),
            bool_masked_pos=model_inputs["bool_masked_pos"],
        )
        return {**model_inputs, "reconstruction": outputs.reconstruction}

    def postprocess(self, model_outputs):
        patch_size = self.model.config.patch_size
        patch_mask = model_outputs["bool_masked_pos"][0].numpy()
        in_masked_patch = patch_mask.repeat(patch_size, axis=0).repeat(patch_size, axis=1)
        pixel_values = model_outputs["pixel_values"][0].numpy()
        reconstruction = model_outputs["reconstruction"][0].float().numpy()
        predicted = self._raw_values(np.where(in_masked_patch, reconstruction, pixel_values))
        original, to_fill = model_outputs["original"], model_outputs["to_fill"]
        height, width, channels = original.shape
        if predicted.shape[1:] != (height, width):
            predicted = resize_channels(predicted, width, height, self.image_processor.resample)
        if channels != predicted.shape[0]:  # a grey image shown to a 3-channel model
            # clipped per channel first, as the RGB fill is, so the grey is PIL's grey of that RGB prediction
            if np.issubdtype(original.dtype, np.integer):
                info = np.iinfo(original.dtype)
                predicted = np.clip(predicted, info.min, info.max)
            predicted = np.tensordot(LUMA, predicted, axes=1)[None]
        filled = original.copy()
        filled[to_fill] = cast_like(np.moveaxis(predicted, 0, -1)[to_fill], original.dtype)
        return in_input_form(filled, model_outputs["form"])

    def _model_channels(self, pixels):
        """(H, W, channels) pixels -> float32 (H, W, num_channels): as they are, or a grey image repeated for RGB."""
        channels, wanted = pixels.shape[-1], self.model.config.num_channels
        if channels == wanted or (channels == 1 and wanted == 3):
            return np.broadcast_to(pixels, pixels.shape[:2] + (wanted,)).astype(np.float32)
        raise InpaintingInputError(
            f"The image has {channels} channel(s) but the model takes {wanted}"
            + (": convert it to RGB (or grey), e.g. drop the alpha channel." if wanted == 3 else
               f": give an array of {wanted} channels (HWC or CHW), as the model was trained on.")
        )

    def _raw_values(self, normalized):
        """Normalised (C, H, W) values -> the input's units: what the image processor's rescale and normalisation
        undo."""
        processor = self.image_processor
        mean = np.asarray(processor.image_mean if processor.do_normalize else 0.0, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(processor.image_std if processor.do_normalize else 1.0, dtype=np.float32).reshape(-1, 1, 1)
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        return ((normalized * std + mean) / scale).astype(np.float32)
