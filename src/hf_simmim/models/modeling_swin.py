"""The Swin Transformer (v1) encoder, as the official microsoft/SimMIM `SwinTransformerForSimMIM`.

Module names follow the official code (`layers.{i}.blocks.{j}.attn.qkv`, `downsample.reduction`, ...). The
relative position index and the shifted-window attention mask are non-persistent buffers computed from the
config, so checkpoints hold only learned weights.
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .modeling_layers import Attention, DropPath, Mlp, fill_masked_tokens, stage_drop_path_rates


def window_partition(x, window):
    """`(B, H, W, C)` -> `(B, nW, window*window, C)`."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows, window, h, w):
    """`(B, nW, window*window, C)` -> `(B, H, W, C)`."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def swin_relative_position_index(window):
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[:, :, 0] * (2 * window - 1) + relative[:, :, 1]


def swin_shift_attention_mask(resolution, window, shift):
    """The official shifted-window mask: 0 inside a region, -100 across regions; `(nW, N, N)`."""
    h, w = resolution
    regions = torch.zeros(1, h, w, 1)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, hs, ws, :] = count
            count += 1
    windows = window_partition(regions, window).squeeze(0).squeeze(-1)  # (nW, N)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(Attention):
    """Attention inside each window with a learned relative position bias; the shift mask comes from the block."""

    def __init__(self, dim, window, num_heads, config):
        super().__init__(config, dim, num_heads)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", swin_relative_position_index(window), persistent=False)

    def relative_position_bias(self):
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def forward(self, windows, shift_mask=None, output_attentions=False):
        """windows: `(B, nW, N, C)`; shift_mask: `(nW, N, N)` or None. Attention weights come back per window,
        `(B * nW, heads, N, N)`, as transformers' Swin returns them."""
        bias = self.relative_position_bias()
        if shift_mask is not None:
            bias = bias.unsqueeze(0) + shift_mask.unsqueeze(1)  # (nW, heads, N, N)
        return super().forward(windows, bias, output_attentions=output_attentions)


def stage_window_and_shift(resolution, window, shift):
    """The window and shift a block of a stage of `resolution` uses: as the official code, a stage no larger than the
    window is one window, unshifted."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


def shifted_window_attention(block, tokens, output_attentions=False):
    """`block.attn` inside the (shifted) windows of `block.resolution`: `(B, L, C)` tokens -> `(B, L, C)`, and the
    attention weights per window (None unless `output_attentions`). The block holds `resolution`, `window`, `shift`,
    `attn` and the shift mask `attn_mask`, as the official Swin blocks (v1 and v2)."""
    b, _, c = tokens.shape
    h, w = block.resolution
    y = tokens.view(b, h, w, c)
    if block.shift:
        y = torch.roll(y, shifts=(-block.shift, -block.shift), dims=(1, 2))
    y, attention_weights = block.attn(window_partition(y, block.window), block.attn_mask, output_attentions)
    y = window_reverse(y, block.window, h, w)
    if block.shift:
        y = torch.roll(y, shifts=(block.shift, block.shift), dims=(1, 2))
    return y.reshape(b, h * w, c), attention_weights


class SwinBlock(GradientCheckpointingLayer):
    def __init__(self, config, dim, resolution, num_heads, shift, drop_path):
        super().__init__()
        window, shift = stage_window_and_shift(resolution, config.window_size, shift)
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = WindowAttention(dim, window, num_heads, config)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.hidden_act, config.hidden_dropout_prob)
        mask = swin_shift_attention_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x, output_attentions=False):
        """Returns the block's output and its attention weights (None unless `output_attentions`)."""
        y, attention_weights = shifted_window_attention(self, self.norm1(x), output_attentions)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), attention_weights


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (official order), normalise, and project 4C -> 2C."""

    def __init__(self, resolution, dim, eps):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        h, w = self.resolution
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """The blocks of one stage (every second one shifted by half a window), then a patch merging unless it is the
    last stage. `block_class` and `merging_class` are the encoder's own (Swin v1 or v2)."""

    def __init__(self, config, stage, drop_paths, block_class, merging_class):
        super().__init__()
        dim = config.embed_dim * 2**stage
        side = config.grid_size // 2**stage
        resolution = (side, side)
        self.blocks = nn.ModuleList(
            [
                block_class(
                    config,
                    dim,
                    resolution,
                    config.num_heads[stage],
                    0 if i % 2 == 0 else config.window_size // 2,
                    drop_paths[i],
                )
                for i in range(config.depths[stage])
            ]
        )
        last = stage == len(config.depths) - 1
        self.downsample = None if last else merging_class(resolution, dim, config.layer_norm_eps)

    def forward(self, x, output_attentions=False):
        """Returns the stage's output and the attention weights of each of its blocks."""
        attentions = []
        for block in self.blocks:
            x, attention_weights = block(x, output_attentions=output_attentions)
            attentions.append(attention_weights)
        return (x if self.downsample is None else self.downsample(x)), attentions


class PatchEmbed(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.embed_dim, config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None

    def forward(self, pixel_values):
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)


class SwinTransformer(nn.Module):
    """Patch embedding (+ norm) -> mask-token fill -> (absolute position) -> stages -> final norm.

    Returns a `BaseModelOutput`: the final tokens `(B, L_last, C_last)` and, on request, the input of each stage plus
    the final output (`hidden_states`) and every block's attention weights, per window (`attentions`).
    """

    def __init__(self, config, use_mask_token=True):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.mask_token = (
            nn.Parameter(torch.zeros(1, 1, config.embed_dim))
            if use_mask_token and config.mask_token_type == "learned"
            else None
        )
        self.absolute_pos_embed = (
            nn.Parameter(torch.zeros(1, config.num_patches, config.embed_dim))
            if config.use_absolute_position_embeddings
            else None
        )
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        rates = stage_drop_path_rates(config.drop_path_rate, config.depths)
        self.layers = nn.ModuleList([self.build_stage(config, i, rates[i]) for i in range(len(config.depths))])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def build_stage(self, config, stage, drop_paths):
        return SwinStage(config, stage, drop_paths, SwinBlock, PatchMerging)

    def forward(self, pixel_values, bool_masked_pos=None, output_hidden_states=False, output_attentions=False):
        x = self.patch_embed(pixel_values)
        if bool_masked_pos is not None:
            x = fill_masked_tokens(x, bool_masked_pos, self.mask_token, self.config.mask_token_type)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        hidden_states, attentions = [], []
        for stage in self.layers:
            hidden_states.append(x)
            x, stage_attentions = stage(x, output_attentions=output_attentions)
            attentions.extend(stage_attentions)
        x = self.norm(x)
        hidden_states.append(x)
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def feature_map(self, sequence):
        """`(B, L, C)` final tokens -> `(B, C, h, w)` map for the decoder."""
        b, _, c = sequence.shape
        g = self.config.feature_grid_size
        return sequence.transpose(1, 2).reshape(b, c, g, g)

    def patch_tokens(self, sequence):
        return sequence

    # Optimizer hooks, as the official encoders answer them (microsoft/SimMIM `optimizer.py` reads them).
    def no_weight_decay(self):
        """Parameter names (relative to the encoder) the official `SwinTransformerForSimMIM` exempts from weight
        decay by name (its fine-tuning `SwinTransformer` has no mask token)."""
        return {"absolute_pos_embed", "mask_token"}

    def no_weight_decay_keywords(self):
        """Substrings exempting parameters from weight decay (the official code applies them in fine-tuning only)."""
        return {"relative_position_bias_table"}

    def num_layers(self):
        """Layer ids of layer-wise learning-rate decay: the embeddings, each block, everything after the blocks."""
        return sum(self.config.depths) + 2

    def layer_id(self, name):
        """The official `get_swin_layer` of a parameter name relative to the encoder, quirks included: a patch
        merging gets the id of its stage's last block, and `absolute_pos_embed` falls to the last layer."""
        if name == "mask_token" or name.startswith("patch_embed"):
            return 0
        if name.startswith("layers."):
            parts = name.split(".")
            stage = int(parts[1])
            if parts[2] == "downsample":
                return sum(self.config.depths[: stage + 1])
            return sum(self.config.depths[:stage]) + int(parts[3]) + 1
        return self.num_layers() - 1  # norm, absolute_pos_embed (and, outside the encoder, the head)
