"""Building blocks shared by the encoders: attention, MLP, drop path and its per-block rates (all five backbones),
and the mask-token fill.

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


def stage_drop_path_rates(rate, depths):
    """The stochastic-depth rate of each block, stage by stage: rising linearly from 0 at the first block to `rate`
    at the last, over all stages (the official ViT / Swin code, timm's ResNet and ConvNeXt)."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, depths)]


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


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out, returning its weights: transformers' ViT/Swin `eager_attention_forward`.

    query/key/value: `(B, heads, N, head_dim)`; `attention_mask` is added to the logits; `scaling` is a float or a
    per-head `(heads, 1, 1)` tensor (SwinV2's logit scale). Returns the output `(B, N, heads, head_dim)` and the
    weights `(B, heads, N, N)`, as transformers' attention functions.
    """
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sdpa_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """`F.scaled_dot_product_attention` with the relative position bias / shift mask as an additive float mask,
    called directly: transformers' own SDPA wrapper turns float masks into boolean ones on some devices (NPU), which
    would drop the bias. Same signature and output layout as `eager_attention_forward`; no weights. SDPA takes one
    float scale, so a per-head `scaling` tensor multiplies the query instead."""
    if torch.is_tensor(scaling):
        query, scaling = query * scaling, 1.0
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, run by the kernel `config._attn_implementation` names
    (`"sdpa"`, the default, or `"eager"`), as transformers' attention layers.

    `x` is `(*batch, N, C)`; `attn_bias` (relative position bias, Swin shift mask) is added to the logits and must
    broadcast to `(*batch, heads, N, N)`. The batch dimensions are flattened into one before attention: SDPA's
    fused CUDA kernels (memory-efficient, cuDNN) take 4-D inputs only and fall back to the slow math kernel
    otherwise. With `output_attentions`, the eager kernel runs (SDPA returns no weights) and the weights
    `(prod(batch), heads, N, N)` come back with the output.
    """

    def __init__(self, config, dim, num_heads, qkv_bias=None):
        super().__init__()
        # Read at every call, so `model.set_attn_implementation(...)` switches every layer at once.
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias if qkv_bias is None else qkv_bias)
        self.attn_drop = config.attention_probs_dropout_prob
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)

    def split_heads(self, qkv):
        """`(*batch, N, 3 * C)` projections -> query, key and value, each `(prod(batch), heads, N, head_dim)`: views of
        `qkv`. Unbound before the heads move ahead of the tokens, so that backward stacks the three gradients straight
        into `qkv`'s layout (unbinding after the move costs another copy of the gradient into that layout)."""
        n = qkv.shape[-2]
        heads = qkv.reshape(-1, n, 3, self.num_heads, self.head_dim).unbind(2)
        return tuple(t.transpose(1, 2) for t in heads)

    def forward(self, x, attn_bias=None, output_attentions=False):
        q, k, v = self.split_heads(self.qkv(x))
        return self.attend(x.shape, q, k, v, attn_bias, self.scaling, output_attentions)

    def attend(self, shape, q, k, v, attn_bias, scaling, output_attentions):
        """Attention over heads `q`, `k`, `v` of an input of `shape` `(*batch, N, C)`, then the output projection;
        returns the output `(*batch, N, C)` and the weights (None unless `output_attentions`)."""
        *batch, n, c = shape
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
            if attn_bias.ndim > 3:  # per-batch-entry bias, e.g. Swin's (nW, heads, N, N) shift mask
                attn_bias = attn_bias.expand(*batch, self.num_heads, n, n).reshape(-1, self.num_heads, n, n)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ATTENTION_FUNCTIONS[implementation]
        out, weights = attention(
            self, q, k, v, attn_bias, dropout=self.attn_drop if self.training else 0.0, scaling=scaling
        )
        out = self.proj_drop(self.proj(out.reshape(*batch, n, c)))
        return out, weights


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
