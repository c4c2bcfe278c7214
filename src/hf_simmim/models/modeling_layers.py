"""Building blocks shared by the ViT and Swin encoders: attention, MLP, drop path, and the mask-token fill.

Relative imports only: a checkpoint saved with its code (`trust_remote_code`) carries this file too.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def drop_path(x, drop_prob, training):
    """Stochastic depth per sample (Huang et al., 2016): zero a sample's residual branch with probability
    `drop_prob` and rescale the survivors by 1 / (1 - drop_prob)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim, act, dropout):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and `F.scaled_dot_product_attention`.

    `x` is `(*batch, N, C)`; `attn_bias` (relative position bias, Swin shift mask) is added to the logits and must
    broadcast to `(*batch, heads, N, N)`. The batch dimensions are flattened into one before attention: SDPA's
    fused CUDA kernels (memory-efficient, cuDNN) take 4-D inputs only and fall back to the slow math kernel
    otherwise.
    """

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_bias=None):
        *batch, n, c = x.shape
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (prod(batch), heads, N, head_dim)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
            if attn_bias.ndim > 3:  # per-batch-entry bias, e.g. Swin's (nW, heads, N, N) shift mask
                attn_bias = attn_bias.expand(*batch, self.num_heads, n, n).reshape(-1, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(*batch, n, c)
        return self.proj_drop(self.proj(out))


def fill_masked_tokens(embeddings, mask, mask_token, mask_token_type):
    """Replace the embeddings of masked patches: `x * (1 - w) + fill * w` with `w` the 0/1 mask.

    embeddings: `(B, L, C)`; mask: `(B, L)` bool or 0/1; fill: the learned `mask_token` (`"learned"`, the paper),
    zeros (`"zeros"`) or standard Gaussian noise (`"noise"`).
    """
    w = mask.reshape(embeddings.shape[0], -1, 1).to(embeddings.dtype)
    if mask_token_type == "learned":
        fill = mask_token.to(embeddings.dtype)
    elif mask_token_type == "noise":
        fill = torch.randn_like(embeddings)
    else:
        return embeddings * (1.0 - w)
    return embeddings * (1.0 - w) + fill * w
