"""Diffusion prior network: a causal transformer mapping CLIP text to a CLIP image embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerNorm, NullKVAttention


@dataclass
class PriorParams:
    dim: int
    depth: int
    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    max_text_len: int = 256
    num_timesteps: int = 1000
    norm_in: bool = False
    norm_out: bool = True
    final_proj: bool = True
    normformer: bool = False
    rotary_emb: bool = True
    # diffusion settings (DiffusionPrior)
    timesteps: int = 1000
    sample_timesteps: int | None = None
    beta_schedule: str = "cosine"
    predict_x_start: bool = True
    predict_v: bool = False
    condition_on_text_encodings: bool = True
    cond_drop_prob: float = 0.0
    image_embed_scale: float | None = None  # default sqrt(dim)
    sampling_clamp_l2norm: bool = False
    sampling_final_clamp_l2norm: bool = False
    init_image_embed_l2norm: bool = False
    # False for checkpoints older than dalle2-pytorch 1.9 (LAION prior): no null embeddings were trained
    guidance_trained: bool = True
    # dalle2-pytorch < 1.4.3 attention numerics (LAION prior); set by the loader from version / layout
    legacy_attention: bool = False

    def __post_init__(self):
        if self.image_embed_scale is None:
            self.image_embed_scale = self.dim**0.5
        if self.num_timesteps != self.timesteps:
            raise ValueError(f"prior net num_timesteps={self.num_timesteps} != diffusion timesteps={self.timesteps}")


class RelPosBias(nn.Module):
    """T5-style bucketed relative position bias, one value per head."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, i: int, j: int, device) -> Tensor:
        # -> [H, i, j]
        rel = torch.arange(j, device=device)[None, :] - torch.arange(i, device=device)[:, None]
        n = (-rel).clamp(min=0)
        exact = self.num_buckets // 2
        far = exact + (
            torch.log(n.clamp(min=1).float() / exact) / math.log(self.max_distance / exact) * (self.num_buckets - exact)
        ).long()
        far = far.clamp(max=self.num_buckets - 1)
        bucket = torch.where(n < exact, n, far)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.silu(gate)


def feed_forward(dim: int, mult: int, normformer: bool) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(
        LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        SwiGLU(),
        LayerNorm(inner) if normformer else nn.Identity(),
        nn.Identity(),  # dropout slot (keeps the checkpoint's indices)
        nn.Linear(inner, dim, bias=False),
    )


class CausalTransformer(nn.Module):
    def __init__(self, p: PriorParams):
        super().__init__()
        self.init_norm = LayerNorm(p.dim) if p.norm_in else nn.Identity()
        self.rel_pos_bias = RelPosBias(p.heads)
        rot = min(32, p.dim_head) if p.rotary_emb else 0
        self.layers = nn.ModuleList(
            nn.ModuleList([
                NullKVAttention(p.dim, p.dim_head, p.heads, cosine_sim=True, rotary_dim=rot, legacy=p.legacy_attention),
                feed_forward(p.dim, p.ff_mult, p.normformer),
            ])
            for _ in range(p.depth)
        )
        self.norm = LayerNorm(p.dim, stable=True) if p.norm_out else nn.Identity()
        self.project_out = nn.Linear(p.dim, p.dim, bias=False) if p.final_proj else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, N, D]
        n = x.shape[1]
        x = self.init_norm(x)
        bias = self.rel_pos_bias(n, n + 1, x.device).float()  # keys: null kv + N tokens
        causal = torch.ones(n, n + 1, dtype=torch.bool, device=x.device).triu(2)
        bias = bias.masked_fill(causal, float("-inf"))
        for attn, ff in self.layers:
            x = attn(x, attn_bias=bias) + x
            x = ff(x) + x
        return self.project_out(self.norm(x))


class DiffusionPriorNetwork(nn.Module):
    """Tokens: [text encodings (T), text embed, time embed, noised image embed, learned query]."""

    def __init__(self, p: PriorParams):
        super().__init__()
        self.params = p
        self.to_time_embeds = nn.Sequential(nn.Embedding(p.num_timesteps, p.dim))
        self.learned_query = nn.Parameter(torch.zeros(p.dim))
        self.causal_transformer = CausalTransformer(p)
        self.null_text_encodings = nn.Parameter(torch.zeros(1, p.max_text_len, p.dim))
        self.null_text_embeds = nn.Parameter(torch.zeros(1, 1, p.dim))
        self.null_image_embed = nn.Parameter(torch.zeros(1, p.dim))

    def forward(self, image_embed: Tensor, t: Tensor, text_embed: Tensor, text_encodings: Tensor | None,
                drop: Tensor) -> Tensor:
        # image_embed, text_embed: [B, D]; t: [B] long; text_encodings: [B, T, D] (zero rows = padding)
        # drop: [B] bool, True = unconditional branch (text and image replaced by null embeddings)
        b, d = image_embed.shape
        L = self.params.max_text_len
        if text_encodings is None:
            text_encodings = image_embed.new_zeros(b, 0, d)
        mask = (text_encodings != 0).any(dim=-1)[:, :L]  # [B, T]
        text_encodings = F.pad(text_encodings[:, :L], (0, 0, 0, L - min(L, text_encodings.shape[1])))
        mask = F.pad(mask, (0, L - mask.shape[1]), value=False)
        keep = ~drop[:, None, None]
        dtype = text_encodings.dtype
        text_encodings = torch.where(mask[..., None] & keep, text_encodings, self.null_text_encodings.to(dtype))
        text_tok = torch.where(keep, text_embed[:, None], self.null_text_embeds.to(dtype))
        image_tok = torch.where(keep[:, 0], image_embed, self.null_image_embed.to(dtype))[:, None]
        time_tok = self.to_time_embeds(t)[:, None]
        query = self.learned_query.to(dtype).expand(b, 1, d)
        tokens = torch.cat((text_encodings, text_tok, time_tok, image_tok, query), dim=1)  # [B, L+4, D]
        return self.causal_transformer(tokens)[:, -1]
