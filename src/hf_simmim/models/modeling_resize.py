"""Resizing position tables when a checkpoint is loaded at another window or image size (e.g. Swin pretrained with
window 6 at 192 px, fine-tuned with window 7 at 224 px).

Relative position bias tables are resized as the official fine-tuning does for both backbones
(`remap_pretrained_keys_swin` / `remap_pretrained_keys_vit` in microsoft/SimMIM `utils.py`): each head's table is fitted
with a cubic spline over source offsets spaced in a geometric progression and evaluated at the new integer offsets
(`fit_table_geometric`); a ViT table's last three rows (the CLS rows) are kept as they are. This needs scipy, imported
only when a table is resized. Absolute position embeddings (`pos_embed`, `absolute_pos_embed`) are interpolated
bicubically, as BEiT and timm do: the official fine-tuning never resizes them. As the official ViT fine-tuning, a model
built with per-block tables (`use_relative_position_bias=True, use_shared_relative_position_bias=False`) starts every
block from a checkpoint's shared table.

SwinV2 has no table to resize: its continuous position bias is an MLP over relative coordinates, rebuilt (with the
relative position index and shift masks) from the config at the new window; `pretrained_window_sizes` keeps the
learned offsets at their coordinates (see `SimMIMConfig.from_dict`).

`plan_position_tables` decides this from the checkpoint's shapes (file headers only) before any weight is loaded, so a
weight of another shape that no interpolation fits is refused before loading; `fill_position_tables` writes the planned
tables once transformers has loaded the rest."""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

SHARED_TABLE = re.compile(r"(^|\.)encoder\.rel_pos_bias\.relative_position_bias_table$")
PER_BLOCK_TABLE = re.compile(r"(^|\.)encoder\.blocks\.\d+\.rel_pos_bias\.relative_position_bias_table$")


def _non_grid_rows(key):
    """Rows of a position table that are not on the patch grid: a ViT relative table's 3 CLS rows (last, as BEiT), a
    ViT absolute embedding's CLS position (first); Swin's tables have none."""
    if key.endswith("relative_position_bias_table"):
        return 3 if "rel_pos_bias." in key else 0
    return 0 if key.endswith("absolute_pos_embed") else 1


def can_resize(key, checkpoint_shape, model_shape):
    """Whether `resize_position_table` fits a checkpoint tensor of `checkpoint_shape` to `model_shape`: a position
    table whose grid part is square in both and whose other sizes (heads, channels) agree."""
    if key.endswith("relative_position_bias_table") and len(checkpoint_shape) == len(model_shape) == 2:
        rows, other = 0, slice(1, None)
    elif key.endswith("pos_embed") and len(checkpoint_shape) == len(model_shape) == 3:
        rows, other = 1, slice(2, None)
    else:
        return False
    extra = _non_grid_rows(key)
    grids = (checkpoint_shape[rows] - extra, model_shape[rows] - extra)
    return checkpoint_shape[other] == model_shape[other] and all(g > 0 and math.isqrt(g) ** 2 == g for g in grids)


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
    extra = _non_grid_rows(key)
    if key.endswith("relative_position_bias_table"):
        rows, _ = target_shape
        grid = value[: value.shape[0] - extra]
        resized = fit_table_geometric(grid, math.isqrt(rows - extra))
        return torch.cat([resized, value[value.shape[0] - extra :]], dim=0) if extra else resized
    # absolute position embeddings: (1, [CLS] + N, C)
    _, tokens, _ = target_shape
    resized = _resize_grid_bicubic(value[0, extra:], math.isqrt(tokens - extra))
    return torch.cat([value[0, :extra], resized], dim=0).unsqueeze(0)


def checkpoint_shapes(state_dict, checkpoint_files):
    """{key: (shape, file)} of the tensors a checkpoint holds, from the file headers (no tensor is read): `file` is
    the safetensors or .bin file holding the key, None for an in-memory `state_dict`."""
    if state_dict is not None:
        return {key: (tuple(value.shape), None) for key, value in state_dict.items()}
    shapes = {}
    for file in checkpoint_files or ():
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as reader:
                shapes.update({key: (tuple(reader.get_slice(key).get_shape()), file) for key in reader.keys()})
        else:
            tensors = torch.load(file, map_location="meta", weights_only=True)
            shapes.update({key: (tuple(value.shape), file) for key, value in tensors.items()})
    return shapes


def read_checkpoint_tensor(state_dict, key, file):
    """The tensor `key` of a checkpoint, from `file` (as `checkpoint_shapes` gives it) or the in-memory `state_dict`."""
    if file is None:
        return state_dict[key]
    if file.endswith(".safetensors"):
        with safe_open(file, framework="pt") as reader:
            return reader.get_tensor(key)
    return torch.load(file, map_location="cpu", mmap=True, weights_only=True)[key]


def _model_key(checkpoint_key, model_shapes, prefix):
    """The model key a checkpoint key loads into, with the base-model prefix added or dropped as transformers does
    (a `SimMIMForMaskedImageModeling` checkpoint loads into a `SimMIMModel`, and back); None if there is none."""
    for key in (checkpoint_key, checkpoint_key.removeprefix(prefix + "."), f"{prefix}.{checkpoint_key}"):
        if key in model_shapes:
            return key
    return None


@dataclass
class PositionTablePlan:
    """What loading a checkpoint into a model built with other sizes takes beyond transformers' plain load.

    resized: {model key: checkpoint key}: position tables interpolated to the model's size.
    copied: {model key: checkpoint key}: per-block ViT tables started from the checkpoint's shared table.
    refused: [(model key, checkpoint shape, model shape)]: weights of another shape that nothing fits.
    """

    resized: dict
    copied: dict
    refused: list


def plan_position_tables(model, shapes):
    """The `PositionTablePlan` for loading a checkpoint of `shapes` (as `checkpoint_shapes` gives them) into `model`
    (its parameters may still be on the meta device: only their shapes are read)."""
    model_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    prefix = model.base_model_prefix
    resized, refused, loaded, unused = {}, [], set(), []
    for checkpoint_key, (shape, _) in shapes.items():
        key = _model_key(checkpoint_key, model_shapes, prefix)
        if key is None:
            unused.append(checkpoint_key)
            continue
        loaded.add(key)
        if shape == model_shapes[key]:
            continue
        if can_resize(key, shape, model_shapes[key]):
            resized[key] = checkpoint_key
        else:
            refused.append((key, shape, model_shapes[key]))
    shared = next((key for key in unused if SHARED_TABLE.search(key)), None)
    copied = {}
    if shared is not None:
        shared_shape = shapes[shared][0]
        copied = {
            key: shared
            for key, shape in model_shapes.items()
            if PER_BLOCK_TABLE.search(key)
            and key not in loaded
            and (shape == shared_shape or can_resize(key, shared_shape, shape))
        }
    return PositionTablePlan(resized, copied, refused)


def fill_position_tables(model, plan, checkpoint_tensors):
    """Write the tables `plan` resizes or copies into the model's (materialised) parameters, from
    `checkpoint_tensors` {checkpoint key: tensor}."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, checkpoint_key in {**plan.resized, **plan.copied}.items():
            target, value = parameters[key], checkpoint_tensors[checkpoint_key]
            if tuple(value.shape) != tuple(target.shape):
                value = resize_position_table(key, value, tuple(target.shape))
            target.copy_(value)
