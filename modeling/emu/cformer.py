"""Emu1's CausalFormer: n_causal learned queries run through the decoder stack of a T5
(t5-base at release) that cross-attends to the ln_visual'd EVA features, then `projection`
to the LLM width.

T5 semantics kept exactly: RMS-style layer norm without mean or bias (variance in float32),
no 1/sqrt(d) attention scaling, causal self-attention with a relative position bias that only
block 0 owns and every block reuses, no position bias in cross-attention, final layer norm.
Module names follow the checkpoint (`cformer.block.N.layer.{0,1,2}...`); the T5 stack's
`embed_tokens` is unused (the queries are embeddings already) and not built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.emu.config import CFormerParams


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


def causal_buckets(n: int, num_buckets: int, max_distance: int, device=None) -> Tensor:
    """T5's unidirectional relative-position buckets: [n, n] long (key j, query i: distance i - j >= 0)."""
    ctx = torch.arange(n, device=device)[:, None]
    mem = torch.arange(n, device=device)[None, :]
    dist = (ctx - mem).clamp(min=0)  # future keys share bucket 0; the causal mask hides them
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(dist < max_exact, dist, large)


class T5Attention(nn.Module):
    def __init__(self, p: CFormerParams, kv_width: int, has_bias: bool):
        super().__init__()
        inner = p.n_heads * p.d_kv
        self.n_heads, self.d_kv = p.n_heads, p.d_kv
        self.q = nn.Linear(p.d_model, inner, bias=False)
        self.k = nn.Linear(kv_width, inner, bias=False)
        self.v = nn.Linear(kv_width, inner, bias=False)
        self.o = nn.Linear(inner, p.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(p.num_buckets, p.n_heads)

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> Tensor:
        # x: [B, Q, d_model]; kv: [B, K, kv_width]; bias: [1 or B, H, Q, K] additive (float) or None
        B, Q, _ = x.shape
        q = self.q(x).view(B, Q, self.n_heads, self.d_kv).transpose(1, 2)
        k = self.k(kv).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)
        v = self.v(kv).view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no scaling
        return self.o(o.transpose(1, 2).reshape(B, Q, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, p: CFormerParams, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(p, p.d_model, has_bias)
        self.layer_norm = T5LayerNorm(p.d_model, p.eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.layer_norm(x)
        return x + self.SelfAttention(h, h, bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, p: CFormerParams):
        super().__init__()
        self.EncDecAttention = T5Attention(p, p.encoder_width, has_bias=False)
        self.layer_norm = T5LayerNorm(p.d_model, p.eps)

    def forward(self, x: Tensor, enc: Tensor) -> Tensor:
        return x + self.EncDecAttention(self.layer_norm(x), enc, None)


class DenseReluDense(nn.Module):
    def __init__(self, p: CFormerParams):
        super().__init__()
        self.gated = p.gated
        if p.gated:
            self.wi_0 = nn.Linear(p.d_model, p.d_ff, bias=False)
            self.wi_1 = nn.Linear(p.d_model, p.d_ff, bias=False)
        else:
            self.wi = nn.Linear(p.d_model, p.d_ff, bias=False)
        self.wo = nn.Linear(p.d_ff, p.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:  # T5 v1.1 "gated-gelu": gelu_new (tanh) gate
            return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


class FeedForwardLayer(nn.Module):
    def __init__(self, p: CFormerParams):
        super().__init__()
        self.DenseReluDense = DenseReluDense(p)
        self.layer_norm = T5LayerNorm(p.d_model, p.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5DecoderBlock(nn.Module):
    def __init__(self, p: CFormerParams, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(p, has_bias), CrossAttentionLayer(p), FeedForwardLayer(p)])

    def forward(self, x: Tensor, enc: Tensor, bias: Tensor) -> Tensor:
        x = self.layer[0](x, bias)
        x = self.layer[1](x, enc)
        return self.layer[2](x)


class T5DecoderStack(nn.Module):
    def __init__(self, p: CFormerParams):
        super().__init__()
        self.params = p
        self.block = nn.ModuleList(T5DecoderBlock(p, has_bias=i == 0) for i in range(p.n_layers))
        self.final_layer_norm = T5LayerNorm(p.d_model, p.eps)

    def position_bias(self, n: int, device, dtype) -> Tensor:
        # [1, H, n, n]: block 0's learned bucket bias plus the causal mask (-inf above the diagonal)
        p = self.params
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(causal_buckets(n, p.num_buckets, p.max_distance, device)).permute(2, 0, 1)[None].to(dtype)
        future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        return bias.masked_fill(future, float("-inf"))

    def forward(self, x: Tensor, enc: Tensor) -> Tensor:
        bias = self.position_bias(x.shape[1], x.device, x.dtype)
        for blk in self.block:
            x = blk(x, enc, bias)
        return self.final_layer_norm(x)


class CausalFormer(nn.Module):
    def __init__(self, p: CFormerParams):
        super().__init__()
        self.params = p
        self.causal_tokens = nn.Parameter(torch.zeros(1, p.n_causal, p.d_model))
        self.cformer = T5DecoderStack(p)
        self.projection = nn.Linear(p.d_model, p.output_dim)

    def forward(self, features: Tensor) -> Tensor:
        # features: [B, N, encoder_width] (ln_visual output) -> [B, n_causal, output_dim]
        if features.ndim != 3 or features.shape[-1] != self.params.encoder_width:
            raise ValueError(f"cformer expects [B, N, {self.params.encoder_width}], got {tuple(features.shape)}")
        x = self.causal_tokens.expand(features.shape[0], -1, -1)
        return self.projection(self.cformer(x, features))
