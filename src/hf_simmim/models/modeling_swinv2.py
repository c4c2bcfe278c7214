"""The Swin Transformer v2 encoder, as microsoft/Swin-Transformer's `SwinTransformerV2ForSimMIM` (`models/simmim.py`,
`models/swin_transformer_v2.py`), the backbone of SimMIM's SwinV2 results.

What differs from Swin v1 (`modeling_swin.py`, whose stage layout, windows, shift masks, patch embedding and mask-token
fill it shares):
- residual post-norm: `x + norm1(attn(x))`, `x + norm2(mlp(x))`, both norms initialised to zero;
- scaled cosine attention: `normalize(q) @ normalize(k)^T * exp(min(logit_scale, log 100))`, a learned scale per
  head, with query and value biases and no key bias (a key bias would turn the normalised keys);
- a continuous relative position bias: a small MLP (`cpb_mlp`) over log-spaced relative coordinates, `16 * sigmoid`
  of its output; the coordinates are scaled by the window the MLP was pretrained with (`pretrained_window_sizes`), so
  a larger window at fine-tuning only adds offsets, with no table to interpolate;
- patch merging projects 4C -> 2C and then normalises (v1 normalises 4C first).

Module names follow the official code (`layers.{i}.blocks.{j}.attn.cpb_mlp.0`, `attn.logit_scale`, `attn.q_bias`,
...). The coordinate table, the relative position index and the shift mask are non-persistent buffers computed from
the config, so checkpoints hold only learned weights.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .modeling_layers import Attention, DropPath, Mlp
from .modeling_swin import (
    SwinStage,
    SwinTransformer,
    shifted_window_attention,
    stage_window_and_shift,
    swin_relative_position_index,
    swin_shift_attention_mask,
)

# The official clamp of the logit scale: attention logits are at most 100 times the cosine similarity.
MAX_LOGIT_SCALE = math.log(100.0)
CPB_HIDDEN_SIZE = 512


def swinv2_relative_coords_table(window, pretrained_window=0):
    """`(1, 2w-1, 2w-1, 2)` relative coordinates of a `window`, as the official code: the offsets divided by
    `pretrained_window - 1` (where a pretrained window is given) or `window - 1`, times 8, then mapped to
    `sign(t) * log2(|t| + 1) / log2(8)`. A window of 1 has only the offset 0, which stays 0 (the official code
    divides it by 0)."""
    offsets = torch.arange(-(window - 1), window, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    divisor = (pretrained_window if pretrained_window > 1 else window) - 1
    if divisor > 0:
        table = table / divisor
    table = table * 8
    return torch.sign(table) * torch.log2(torch.abs(table) + 1.0) / math.log2(8)


class CosineWindowAttention(Attention):
    """SwinV2 window attention: scaled cosine attention plus the continuous position bias; the shift mask comes from
    the block. SDPA runs it too: the normalised query is multiplied by the per-head scale (see
    `sdpa_attention_forward`) and the bias is its float mask."""

    def __init__(self, dim, window, num_heads, config, pretrained_window=0):
        super().__init__(config, dim, num_heads, qkv_bias=False)
        self.window, self.pretrained_window = window, pretrained_window
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.q_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if config.qkv_bias else None
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN_SIZE), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN_SIZE, num_heads, bias=False)
        )
        table = swinv2_relative_coords_table(window, pretrained_window)
        self.register_buffer("relative_coords_table", table, persistent=False)
        self.register_buffer("relative_position_index", swin_relative_position_index(window), persistent=False)

    def relative_position_bias(self):
        """`(heads, N, N)`: `16 * sigmoid` of the MLP's output at each pair's relative coordinates."""
        n = self.window * self.window
        table = self.cpb_mlp(self.relative_coords_table.to(self.cpb_mlp[0].weight.dtype)).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, windows, shift_mask=None, output_attentions=False):
        """windows: `(B, nW, N, C)`; shift_mask: `(nW, N, N)` or None. Attention weights come back per window,
        `(B * nW, heads, N, N)`."""
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = self.split_heads(F.linear(windows, self.qkv.weight, qkv_bias))
        scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        bias = self.relative_position_bias()
        if shift_mask is not None:
            bias = bias.unsqueeze(0) + shift_mask.unsqueeze(1)  # (nW, heads, N, N)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return self.attend(windows.shape, q, k, v, bias, scale.to(q.dtype), output_attentions)


class SwinV2Block(GradientCheckpointingLayer):
    """Window attention and MLP with residual post-norm; `pretrained_window` is the stage's entry of
    `pretrained_window_sizes`."""

    def __init__(self, config, dim, resolution, num_heads, shift, drop_path, pretrained_window=0):
        super().__init__()
        window, shift = stage_window_and_shift(resolution, config.window_size, shift)
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = CosineWindowAttention(dim, window, num_heads, config, pretrained_window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.hidden_act, config.hidden_dropout_prob)
        mask = swin_shift_attention_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)
        # The official `_init_respostnorm`: both post-norms start at zero, so every block starts as the identity.
        self.norm1.init_weight = self.norm2.init_weight = 0.0

    def forward(self, x, output_attentions=False):
        """Returns the block's output and its attention weights (None unless `output_attentions`)."""
        y, attention_weights = shifted_window_attention(self, x, output_attentions)
        x = x + self.drop_path(self.norm1(y))
        return x + self.drop_path(self.norm2(self.mlp(x))), attention_weights


class SwinV2PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (official order), project 4C -> 2C, and normalise."""

    def __init__(self, resolution, dim, eps):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)

    def forward(self, x):
        b, _, c = x.shape
        h, w = self.resolution
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x.view(b, -1, 4 * c)))


class SwinV2Transformer(SwinTransformer):
    """Swin v1's encoder (patch embedding, mask-token fill, stages, final norm, optimizer hooks) with SwinV2 stages."""

    def build_stage(self, config, stage, drop_paths):
        pretrained_window = config.pretrained_window_sizes[stage]

        def block(*args):
            return SwinV2Block(*args, pretrained_window=pretrained_window)

        return SwinStage(config, stage, drop_paths, block, SwinV2PatchMerging)

    def no_weight_decay_keywords(self):
        """Substrings exempting parameters from weight decay in fine-tuning, as the official `SwinTransformerV2`: the
        position-bias MLP and the logit scales (the official pretraining decays them; see `training/optim.py`)."""
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}
