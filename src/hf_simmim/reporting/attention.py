"""Where the last block of a SimMIM encoder looks, drawn over the image (`hf-simmim attention`).

The weights come from the models' eager attention path, `model(pixel_values, output_attentions=True).attentions`
(transformers' convention: one tensor per block, the last block last). What is drawn:
- ViT: the CLS token's attention to each patch, averaged over the heads (DINO's picture);
- Swin has no CLS token and attends inside windows only: each position's attention received, averaged over the heads
  and over the queries of its window. Each window's values sum to 1, so the map compares positions within a window;
  in the last stage of the paper's models (and of the tiny presets) one window covers the whole image.
Each map is scaled to [0, 1] per image before it is coloured. The convolutional encoders (ResNet, ConvNeXt) have no
attention: they are refused, naming `hf-simmim reconstruct`.
"""

import os

import numpy as np
import torch

from ..models.modeling_swin import window_reverse
from .pictures import denormalize, load_images, panel_grid

ATTENTION_COLUMNS = ("image", "last-block attention")
_WINDOW_CAPTION = "last block: attention received, mean over heads and the queries of each window"
CAPTIONS = {
    "vit": "CLS attention of the last block, mean over heads", "swin": _WINDOW_CAPTION, "swinv2": _WINDOW_CAPTION
}


def vit_cls_attention(attention, grid_size):
    """`(B, heads, 1 + L, 1 + L)` attention of a ViT block -> `(B, g, g)`: the CLS query's weight on each patch,
    averaged over the heads."""
    return attention[:, :, 0, 1:].mean(dim=1).reshape(-1, grid_size, grid_size)


def swin_window_attention(attention, resolution, window, shift):
    """Attention of a Swin block, `(B * nW, heads, N, N)` or `(B, nW, heads, N, N)` with `N = window**2` -> `(B, h, w)`:
    the weight each position receives, averaged over the heads and the queries of its window, put back where the
    (shifted) window lies in the image."""
    h, w = resolution
    num_windows, n = (h // window) * (w // window), window * window
    received = attention.reshape(-1, num_windows, attention.shape[-3], n, n).mean(dim=(2, 3))  # (B, nW, N)
    grid = window_reverse(received.unsqueeze(-1), window, h, w).squeeze(-1)
    # The block rolled its input by -shift before cutting windows; roll the map back onto the image.
    return torch.roll(grid, shifts=(shift, shift), dims=(1, 2)) if shift else grid


@torch.no_grad()
def last_block_attention(model, pixel_values):
    """`(B, h, w)` float32 map of the last block's attention (see the module docstring) for any SimMIM model."""
    encoder_model = model.base_model
    was_training = encoder_model.training
    encoder_model.eval()
    try:
        outputs = encoder_model(pixel_values, output_attentions=True, return_dict=True)
    finally:
        encoder_model.train(was_training)
    last = outputs.attentions[-1].float().cpu()
    if model.config.backbone == "vit":
        return vit_cls_attention(last, model.config.grid_size)
    block = encoder_model.encoder.layers[-1].blocks[-1]
    return swin_window_attention(last, block.resolution, block.window, block.shift)


def heat_colours(values):
    """`(...,)` values in [0, 1] -> `(..., 3)` uint8 colours of the "hot" scale: black, red, yellow, white."""
    channels = [np.clip(3.0 * values - offset, 0.0, 1.0) for offset in (0.0, 1.0, 2.0)]
    return (np.stack(channels, axis=-1) * 255.0 + 0.5).astype(np.uint8)


def attention_overlay(images, maps, opacity=0.6):
    """uint8 `(B, H, W, 3)` images and `(B, h, w)` maps (H, W multiples of h, w) -> the maps, scaled to [0, 1] per
    image and coloured, blended over the images."""
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    scaled = (maps - low) / np.where(span > 0, span, 1.0)
    factor_h, factor_w = images.shape[1] // maps.shape[1], images.shape[2] // maps.shape[2]
    colours = heat_colours(scaled.repeat(factor_h, axis=1).repeat(factor_w, axis=2))
    blended = (1.0 - opacity) * images.astype(np.float64) + opacity * colours
    return (blended + 0.5).astype(np.uint8)


def attention_images(checkpoint, image_paths, output_path):
    """Draw the last block's attention of a SimMIM checkpoint (pretraining or fine-tuned) over image files; save the
    picture as `output_path` (returned): a row per image, the image and its attention map."""
    from ..models.configuration_simmim import SimMIMConfig
    from ..models.modeling_simmim import SimMIMModel

    backbone = SimMIMConfig.from_pretrained(checkpoint).backbone
    if backbone not in CAPTIONS:
        raise ValueError(
            f"{checkpoint} is a {backbone} model: a convolutional encoder has no attention to draw. Draw its "
            "reconstructions with `hf-simmim reconstruct` instead."
        )
    model = SimMIMModel.from_pretrained(checkpoint, attn_implementation="eager")  # the kernel that returns weights
    processor, batch = load_images(checkpoint, model.config, image_paths)
    maps = last_block_attention(model, batch["pixel_values"]).numpy()
    images = denormalize(batch["pixel_values"], processor.image_mean, processor.image_std)
    grid = panel_grid(
        [images, attention_overlay(images, maps)],
        ATTENTION_COLUMNS,
        title=os.path.basename(os.path.normpath(str(checkpoint))),
        caption=CAPTIONS[model.config.backbone],
    )
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    grid.save(output_path)
    return output_path
