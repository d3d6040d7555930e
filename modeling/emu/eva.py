"""The EVA-CLIP vision towers of Emu: EVA-CLIP-E-plus (Emu2, post-norm) and EVA-CLIP-g (Emu1, pre-norm).

Both are plain ViTs: a patch conv, a CLS token, learned absolute positions, then blocks of
attention (q and v biases, no k bias) and a GELU MLP; no final norm is used by Emu. Module
names follow Emu1's checkpoint (`attn.q_bias`, `attn.v_bias`); Emu2's release stores the biases
fused as `attn.qkv.bias` = [q, 0, v], which the loader splits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.emu.config import EVAParams


class EVAAttention(nn.Module):
    def __init__(self, p: EVAParams):
        super().__init__()
        self.heads = p.heads
        self.qkv = nn.Linear(p.width, 3 * p.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(p.width))
        self.v_bias = nn.Parameter(torch.zeros(p.width))
        self.proj = nn.Linear(p.width, p.width)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, N, W]
        B, N, W = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # a k bias cancels in softmax
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5, as the reference
        return self.proj(o.transpose(1, 2).reshape(B, N, W))


class EVAMlp(nn.Module):
    def __init__(self, p: EVAParams):
        super().__init__()
        self.fc1 = nn.Linear(p.width, p.mlp_dim)
        self.fc2 = nn.Linear(p.mlp_dim, p.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default


class EVABlock(nn.Module):
    def __init__(self, p: EVAParams):
        super().__init__()
        self.postnorm = p.postnorm
        self.norm1 = nn.LayerNorm(p.width, eps=p.eps)
        self.attn = EVAAttention(p)
        self.norm2 = nn.LayerNorm(p.width, eps=p.eps)
        self.mlp = EVAMlp(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, p: EVAParams):
        super().__init__()
        self.proj = nn.Conv2d(3, p.width, kernel_size=p.patch_size, stride=p.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, 3, S, S] -> [B, g*g, W] (row-major)


class EVAVisionTower(nn.Module):
    def __init__(self, p: EVAParams):
        super().__init__()
        self.params = p
        self.patch_embed = PatchEmbed(p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, p.grid * p.grid + 1, p.width))
        self.blocks = nn.ModuleList(EVABlock(p) for _ in range(p.layers))

    def forward(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] (EVA-normalised) -> [B, 1 + g*g, W], CLS first, no final norm
        S = self.params.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"EVA expects pixels [B, 3, {S}, {S}], got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.cls_token.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x


def pool_features(features: Tensor, n_query: int) -> Tensor:
    """Emu2's image tokens: drop CLS, average-pool the g x g grid to n_query tokens (row-major).
    features: [B, 1 + g*g, W] -> [B, n_query, W]"""
    B, N, W = features.shape
    g = int(round((N - 1) ** 0.5))
    q = int(round(n_query**0.5))
    stride = g // q if q else 0  # the reference's rule: int(sqrt(patches) // sqrt(n_query))
    if g * g != N - 1 or q * q != n_query or stride < 1 or (g - stride) // stride + 1 != q:
        raise ValueError(f"cannot pool {N - 1} patches to {n_query} tokens (square grids with {g} // {q} windows)")
    grid = features[:, 1:].transpose(1, 2).reshape(B, W, g, g)
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)
    return pooled.reshape(B, W, n_query).transpose(1, 2).contiguous()
