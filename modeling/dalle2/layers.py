"""Small building blocks shared by the prior and the decoder unets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    """LayerNorm with a gain only; `stable` divides by the row max first (prior output norm)."""

    def __init__(self, dim: int, stable: bool = False, channel_dim: int = -1):
        super().__init__()
        self.stable = stable
        self.channel_dim = channel_dim
        shape = (dim,) if channel_dim == -1 else (1, dim, 1, 1)
        self.g = nn.Parameter(torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        d = self.channel_dim
        if self.stable:
            x = x / x.amax(dim=d, keepdim=True).detach()
        var = torch.var(x, dim=d, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=d, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    # t: [B] float -> [B, dim]
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device, dtype=t.dtype) * -(math.log(10000) / (half - 1)))
    emb = t[:, None] * freq[None, :]
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


def l2norm(t: Tensor) -> Tensor:
    return F.normalize(t, dim=-1)


class NullKVAttention(nn.Module):
    """Multi-query attention (one k/v head) with a learned null key/value in front.

    Used by the prior's causal transformer (cosine-sim, rotary, relative bias) and by the
    unets' full self-attention. Scores: `scale * cos(q, k)` with cosine_sim, otherwise
    `q.k / dim_head` (the reference applies dim_head**-0.5 twice). `legacy` is the
    dalle2-pytorch < 1.4.3 form (LAION releases): `q.k / sqrt(dim_head) + 128 * bias`
    (its "pb-relax" rescaling multiplies the relative position bias by alpha = 128).
    """

    def __init__(self, dim: int, dim_head: int, heads: int, cosine_sim: bool, cosine_sim_scale: float = 16.0,
                 rotary_dim: int = 0, legacy: bool = False):
        super().__init__()
        self.heads, self.dim_head, self.cosine_sim = heads, dim_head, cosine_sim and not legacy
        self.scale = dim_head**-0.5 if legacy else cosine_sim_scale if cosine_sim else dim_head**-1.0
        self.bias_scale = 128.0 if legacy else 1.0
        inner = dim_head * heads
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.zeros(2, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        if rotary_dim:
            self.rotary_emb = Rotary(rotary_dim)
        else:
            self.rotary_emb = None
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), LayerNorm(dim))

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        # x: [B, N, D]; attn_bias: [H, N, N+1] additive (incl. -inf for masked)
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, H, N, Dh]
        k, v = self.to_kv(x).chunk(2, dim=-1)  # [B, N, Dh]
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(q), self.rotary_emb(k)
        nk, nv = (t.to(x.dtype).expand(b, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((nk, k), dim=1), torch.cat((nv, v), dim=1)  # [B, N+1, Dh]
        if self.cosine_sim:
            q, k = l2norm(q), l2norm(k)
        k = k[:, None].expand(b, self.heads, n + 1, self.dim_head)
        v = v[:, None].expand(b, self.heads, n + 1, self.dim_head)
        mask = None if attn_bias is None else (attn_bias * self.bias_scale).to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class Rotary(nn.Module):
    """Rotary embedding on the first `dim` features, interleaved pairs (rotary-embedding-torch layout)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("freqs", self._freqs())

    def _freqs(self, device=None) -> Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device)[: self.dim // 2].float() / self.dim))

    def forward(self, t: Tensor) -> Tensor:
        # t: [..., N, D]; rotates t[..., :rot] by position along N
        n = t.shape[-2]
        pos = torch.arange(n, device=t.device, dtype=torch.float32)
        freqs = self.freqs if self.freqs.dtype == torch.float32 else self._freqs(t.device)  # keep angles in fp32
        ang = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [N, rot]
        rot = ang.shape[-1]
        head, tail = t[..., :rot], t[..., rot:]
        pairs = head.unflatten(-1, (-1, 2))
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        head = head * ang.cos() + rotated * ang.sin()
        return torch.cat((head, tail), dim=-1).to(t.dtype)
