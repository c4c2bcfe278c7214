"""Resizing position tables when a checkpoint is loaded at another window or image size (e.g. Swin pretrained with
window 6 at 192 px, fine-tuned with window 7 at 224 px).

Relative position bias tables are resized as the official fine-tuning does for both backbones
(`remap_pretrained_keys_swin` / `remap_pretrained_keys_vit` in microsoft/SimMIM `utils.py`): each head's table is fitted
with a cubic spline over source offsets spaced in a geometric progression and evaluated at the new integer offsets
(`fit_table_geometric`); a ViT table's last three rows (the CLS rows) are kept as they are. This needs scipy, imported
only when a table is resized. Absolute position embeddings (`pos_embed`, `absolute_pos_embed`) are interpolated
bicubically, as BEiT and timm do: the official fine-tuning never resizes them. As the official ViT fine-tuning, a model
built with per-block tables (`use_relative_position_bias=True, use_shared_relative_position_bias=False`) starts every
block from a checkpoint's shared table (`load_shared_table_into_blocks`)."""

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

RESIZABLE_SUFFIXES = ("relative_position_bias_table", "pos_embed", "absolute_pos_embed")
SHARED_TABLE = re.compile(r"(^|\.)encoder\.rel_pos_bias\.relative_position_bias_table$")
PER_BLOCK_TABLE = re.compile(r"(^|\.)encoder\.blocks\.\d+\.rel_pos_bias\.relative_position_bias_table$")


def is_resizable(key):
    return key.endswith(RESIZABLE_SUFFIXES)


def _grid_side(grid_values):
    side = math.isqrt(grid_values.shape[0])
    if side * side != grid_values.shape[0]:
        raise ValueError(f"cannot resize a table of {grid_values.shape[0]} rows: not a square grid")
    return side


def _resize_grid_bicubic(grid_values, new_side):
    """(rows = side*side, C) -> (new_side*new_side, C) by bicubic interpolation over the square grid."""
    side = _grid_side(grid_values)
    image = grid_values.float().T.reshape(1, -1, side, side)
    image = F.interpolate(image, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return image.reshape(-1, new_side * new_side).T.to(grid_values.dtype)


def geometric_source_offsets(side, new_side):
    """The offsets the official fine-tuning gives a `side`-wide table's rows and columns: 0 and +-(1, 1 + q,
    1 + q + q^2, ...), with q found by bisection on [1.01, 1.5] so that the outermost offset lands on `new_side // 2`.
    Written as the official loop (the last midpoint is q) so the offsets match it to the bit."""
    half = side // 2
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**half) / (1.0 - q) > new_side // 2:
            right = q
        else:
            left = q
    distances, cur = [], 1.0
    for i in range(half):
        distances.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(distances)] + [0.0] + distances


def fit_table_geometric(grid_values, new_side):
    """(rows = side*side, heads) -> (new_side*new_side, heads): per head, a bicubic interpolating spline over the
    geometric source offsets, evaluated at the integer offsets -new_side//2 .. new_side//2. `RectBivariateSpline` on
    the transposed grid reproduces the official `interp2d(x, y, z, kind='cubic')` (removed in SciPy 1.14) bitwise."""
    from scipy.interpolate import RectBivariateSpline  # only a resize needs scipy

    side = _grid_side(grid_values)
    offsets = np.array(geometric_source_offsets(side, new_side))
    half = new_side // 2
    targets = np.arange(-half, half + 1, dtype=np.float64)
    heads = []
    for table in grid_values.detach().float().cpu().T:  # one (side*side,) table per head
        z = table.reshape(side, side).double().numpy()  # rows: vertical offset, columns: horizontal offset
        fitted = RectBivariateSpline(offsets, offsets, z.T, kx=3, ky=3, s=0)(targets, targets).T
        heads.append(torch.from_numpy(fitted.astype(np.float32)).reshape(-1))
    return torch.stack(heads, dim=1).to(grid_values.dtype)


def resize_position_table(key, value, target_shape):
    """Resize `value` (as saved under `key`) to `target_shape`."""
    if key.endswith("relative_position_bias_table"):
        rows, _ = target_shape
        extra = 3 if "rel_pos_bias." in key else 0  # ViT tables end with the CLS rows; Swin tables have none
        grid = value[: value.shape[0] - extra]
        resized = fit_table_geometric(grid, math.isqrt(rows - extra))
        return torch.cat([resized, value[value.shape[0] - extra :]], dim=0) if extra else resized
    # absolute position embeddings: (1, [CLS] + N, C)
    _, tokens, _ = target_shape
    extra = tokens - math.isqrt(tokens) ** 2  # 1 for ViT's CLS position, 0 for Swin
    resized = _resize_grid_bicubic(value[0, extra:], math.isqrt(tokens - extra))
    return torch.cat([value[0, :extra], resized], dim=0).unsqueeze(0)


def checkpoint_files(path, **hub_kwargs):
    """The safetensors file(s) of a local folder or hub repository."""
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is not None:
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [cached_file(path, name, **hub_kwargs) for name in names]
    return [cached_file(path, "model.safetensors", **hub_kwargs)]


def read_tensors(files, wanted_suffixes):
    """Tensors whose key ends with one of `wanted_suffixes` -> {suffix: tensor}."""
    found = {}
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():
                for suffix in wanted_suffixes:
                    if key == suffix or key.endswith("." + suffix):
                        found[suffix] = reader.get_tensor(key)
    return found


def load_resized_position_tables(model, mismatched, path, **hub_kwargs):
    """Fill the model's mismatched position tables from the checkpoint at `path`, interpolated to size."""
    prefix = model.base_model_prefix + "."
    suffixes = {key: key[len(prefix) :] if key.startswith(prefix) else key for key in mismatched}
    tensors = read_tensors(checkpoint_files(os.fspath(path), **hub_kwargs), set(suffixes.values()))
    parameters = dict(model.named_parameters())
    for key, suffix in suffixes.items():
        target = parameters[key]
        with torch.no_grad():
            target.copy_(resize_position_table(key, tensors[suffix], tuple(target.shape)))


def load_shared_table_into_blocks(model, per_block_keys, path, **hub_kwargs):
    """Copy a checkpoint's shared ViT relative position table into each block's own table (resized if the
    image size differs), as the official fine-tuning does (`remap_pretrained_keys_vit`)."""
    suffix = "encoder.rel_pos_bias.relative_position_bias_table"
    shared = read_tensors(checkpoint_files(os.fspath(path), **hub_kwargs), {suffix})[suffix]
    parameters = dict(model.named_parameters())
    for key in per_block_keys:
        target = parameters[key]
        value = shared if shared.shape == target.shape else resize_position_table(key, shared, tuple(target.shape))
        with torch.no_grad():
            target.copy_(value)
