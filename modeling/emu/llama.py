"""The LLaMA decoder of Emu (LLaMA-13B for Emu1, the 33B shape for Emu2) with a static KV cache.

Rows are left-padded into one batch. A forward writes its tokens into cache columns `cols`
(the same columns for every row), rotates q/k by per-row positions `pos` (cumsum(mask) - 1, so
a padded row sees the positions it would see alone) and attends to every cache column that is
(a) a real token of the row (`key_valid`) and (b) not after the query's column. A query always
sees its own column, so pad rows never attend to nothing (no NaN reaches a real row's keys).

RMSNorm and RoPE run in float32 whatever the weights' dtype; the RoPE table is computed from
rope_theta in float32 (never from a checkpoint's, possibly bf16-rounded, inv_freq).
Module names follow the release's `...lm.model.*` (no lm_head: image generation never reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.emu.config import LlamaParams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * h).to(x.dtype)


def inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    # float32, as transformers computes it: 1 / theta^(2i / d)
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def rope_table(max_len: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    # cos, sin: [max_len, head_dim] float32 (the two halves repeat)
    freqs = torch.arange(max_len, device=device, dtype=torch.float32)[:, None] * inv_freq(head_dim, theta, device)[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, hd]; cos, sin: [B, 1, S, hd] float32 -> x's dtype
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, max_batch: int, max_len: int, n_kv: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (max_batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, cols: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # cols: [S]; k, v: [B, Hkv, S, hd] -> the first B rows of the cache: [B, Hkv, max_len, hd]
        kc, vc = self.k[: k.shape[0]], self.v[: v.shape[0]]
        kc.index_copy_(2, cols, k)
        vc.index_copy_(2, cols, v)
        return kc, vc


class Attention(nn.Module):
    def __init__(self, p: LlamaParams):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = p.n_heads, p.n_kv_heads, p.head_dim
        self.q_proj = nn.Linear(p.dim, p.n_heads * p.head_dim, bias=False)
        self.k_proj = nn.Linear(p.dim, p.n_kv_heads * p.head_dim, bias=False)
        self.v_proj = nn.Linear(p.dim, p.n_kv_heads * p.head_dim, bias=False)
        self.o_proj = nn.Linear(p.n_heads * p.head_dim, p.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cols: Tensor, mask: Tensor) -> Tensor:
        # x: [B, S, D]; mask: [B, 1, S, max_len] bool
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(cols, k, v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, p: LlamaParams):
        super().__init__()
        self.gate_proj = nn.Linear(p.dim, p.ffn_dim, bias=False)
        self.up_proj = nn.Linear(p.dim, p.ffn_dim, bias=False)
        self.down_proj = nn.Linear(p.ffn_dim, p.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, p: LlamaParams):
        super().__init__()
        self.input_layernorm = RMSNorm(p.dim, p.rms_eps)
        self.self_attn = Attention(p)
        self.post_attention_layernorm = RMSNorm(p.dim, p.rms_eps)
        self.mlp = MLP(p)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cols: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cols, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    def __init__(self, p: LlamaParams):
        super().__init__()
        self.params = p
        self.embed_tokens = nn.Embedding(p.vocab_size, p.dim)
        self.layers = nn.ModuleList(DecoderLayer(p) for _ in range(p.n_layers))
        self.norm = RMSNorm(p.dim, p.rms_eps)
        self.max_batch = self.max_len = 0

    def setup_caches(self, max_batch: int, max_len: int) -> None:
        """Allocate the KV cache and RoPE table once (idempotent while the request fits)."""
        if max_batch < 1 or max_len < 1:
            raise ValueError(f"setup_caches needs max_batch, max_len >= 1, got {max_batch}, {max_len}")
        w = self.embed_tokens.weight
        if w.is_meta:
            raise ValueError("setup_caches on a meta-device model: load the weights first")
        if max_batch <= self.max_batch and max_len <= self.max_len and self.layers[0].self_attn.kv_cache is not None:
            return
        p = self.params
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_len, p.n_kv_heads, p.head_dim, w.device, w.dtype)
        cos, sin = rope_table(max_len, p.head_dim, p.rope_theta, w.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_batch, self.max_len = max_batch, max_len

    def forward(self, x: Tensor, cols: Tensor, pos: Tensor, key_valid: Tensor) -> Tensor:
        # x: [B, S, D] input embeddings; cols: [S] cache columns; pos: [B, S] RoPE positions;
        # key_valid: [B, max_len] bool (False at left padding) -> final-norm hidden [B, S, D]
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]
        col = torch.arange(key_valid.shape[1], device=x.device)
        own = col[None, :] == cols[:, None]  # [S, max_len]
        mask = (key_valid[:, None, :] & (col[None, :] <= cols[:, None])[None]) | own[None]
        mask = mask[:, None]  # [B, 1, S, max_len]
        for layer in self.layers:
            x = layer(x, cos, sin, cols, mask)
        return self.norm(x)
