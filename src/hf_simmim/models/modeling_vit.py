"""The ViT encoder: plain ViT (absolute position embeddings) and the official SimMIM ViT variant (a relative
position bias shared by all blocks, layer scale, no absolute position embedding), and everything in between.

Module names follow the official microsoft/SimMIM code (`patch_embed`, `blocks.{i}.attn.qkv`, `gamma_1`, ...),
so an official checkpoint maps onto this encoder key for key.
"""

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput

from .modeling_layers import Attention, DropPath, Mlp, fill_masked_tokens, stage_drop_path_rates


def vit_relative_position_index(grid_size):
    """Index into a `(2g-1)^2 + 3` bias table for `g*g` patch tokens plus a leading CLS token.

    The last three rows of the table are CLS->token, token->CLS and CLS->CLS, as in BEiT and the official code.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid_size - 1)
    num_distances = (2 * grid_size - 1) ** 2 + 3
    index = torch.zeros(grid_size**2 + 1, grid_size**2 + 1, dtype=torch.long)
    index[1:, 1:] = relative[:, :, 0] * (2 * grid_size - 1) + relative[:, :, 1]
    index[0, 0:] = num_distances - 3
    index[0:, 0] = num_distances - 2
    index[0, 0] = num_distances - 1
    return index


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, returned as `(heads, N+1, N+1)` logits to add."""

    def __init__(self, grid_size, num_heads):
        super().__init__()
        self.grid_size = grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", vit_relative_position_index(grid_size), persistent=False)

    def forward(self):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, num_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values):
        return self.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, L, C)


class ViTBlock(GradientCheckpointingLayer):
    def __init__(self, config, drop_path, layer_id):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(config, dim, config.num_attention_heads)
        self.rel_pos_bias = (
            RelativePositionBias(config.grid_size, config.num_attention_heads)
            if config.use_relative_position_bias
            else None
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), config.hidden_act, config.hidden_dropout_prob)
        if config.layer_scale_init_value:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
        else:
            self.gamma_1 = self.gamma_2 = None
        # The official init divides the residual output projections by sqrt(2 * layer_id), layer_id = block index + 1
        # (`fix_init_weight`); `_init_weights` applies it to the draw and its bounds.
        self.attn.proj.init_scale = self.mlp.fc2.init_scale = (2.0 * (layer_id + 1)) ** -0.5

    def forward(self, x, shared_bias=None, output_attentions=False):
        """Returns the block's output and its attention weights (None unless `output_attentions`)."""
        bias = shared_bias
        if self.rel_pos_bias is not None:
            own = self.rel_pos_bias()
            bias = own if bias is None else bias + own
        y, attention_weights = self.attn(self.norm1(x), bias, output_attentions=output_attentions)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y), attention_weights


class VisionTransformer(nn.Module):
    """Patch embedding -> mask-token fill -> [CLS] + position embedding -> blocks -> final norm.

    Returns a `BaseModelOutput`: the token sequence `(B, 1 + L, C)` (CLS first) and, on request, the input of every
    block plus the final output (`hidden_states`) and every block's attention weights `(B, heads, 1 + L, 1 + L)`.
    """

    def __init__(self, config, use_mask_token=True):
        super().__init__()
        dim = config.hidden_size
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = (
            nn.Parameter(torch.zeros(1, 1, dim)) if use_mask_token and config.mask_token_type == "learned" else None
        )
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, config.num_patches + 1, dim))
            if config.use_absolute_position_embeddings
            else None
        )
        self.pos_drop = nn.Dropout(config.hidden_dropout_prob)
        self.rel_pos_bias = (
            RelativePositionBias(config.grid_size, config.num_attention_heads)
            if config.use_shared_relative_position_bias
            else None
        )
        (rates,) = stage_drop_path_rates(config.drop_path_rate, [config.num_hidden_layers])
        self.blocks = nn.ModuleList([ViTBlock(config, rate, i) for i, rate in enumerate(rates)])
        self.norm = nn.Identity() if config.use_mean_pooling else nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, pixel_values, bool_masked_pos=None, output_hidden_states=False, output_attentions=False):
        x = self.patch_embed(pixel_values)
        if bool_masked_pos is not None:
            x = fill_masked_tokens(x, bool_masked_pos, self.mask_token, self.config.mask_token_type)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        hidden_states, attentions = [], []
        for block in self.blocks:
            hidden_states.append(x)
            x, attention_weights = block(x, shared_bias, output_attentions=output_attentions)
            attentions.append(attention_weights)
        x = self.norm(x)
        hidden_states.append(x)
        return BaseModelOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def feature_map(self, sequence):
        """`(B, 1 + L, C)` tokens -> `(B, C, g, g)` map of the patch tokens (CLS dropped), for the decoder."""
        b, _, c = sequence.shape
        g = self.config.grid_size
        return sequence[:, 1:].transpose(1, 2).reshape(b, c, g, g)

    def patch_tokens(self, sequence):
        return sequence[:, 1:]

    # Optimizer hooks, as the official encoders answer them (microsoft/SimMIM `optimizer.py` reads them).
    def no_weight_decay(self):
        """Parameter names (relative to the encoder) the official ViT exempts from weight decay by name. The mask
        token and the relative position bias tables are not among them: the official code decays those."""
        return {"pos_embed", "cls_token"}

    def no_weight_decay_keywords(self):
        """Substrings exempting parameters from weight decay: the official ViT has none."""
        return set()

    def num_layers(self):
        """Layer ids of layer-wise learning-rate decay: the embeddings, each block, everything after the blocks."""
        return len(self.blocks) + 2

    def layer_id(self, name):
        """The official `get_vit_layer` of a parameter name relative to the encoder."""
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers() - 1  # the shared rel_pos_bias, norm (and, outside the encoder, fc_norm and head)
