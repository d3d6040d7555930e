"""Unet building blocks; `p` is the UnetParams of the unet they belong to."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerNorm, NullKVAttention, l2norm

if TYPE_CHECKING:  # unet.py imports these blocks
    from .unet import UnetParams


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int, ws: bool):
        super().__init__()
        self.project = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.ws = ws

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if self.ws:  # weight standardisation
            w = self.project.weight
            eps = 1e-5 if x.dtype == torch.float32 else 1e-3
            var, mean = torch.var_mean(w.flatten(1), dim=1, unbiased=False)
            w = (w - mean[:, None, None, None]) * (var[:, None, None, None] + eps).rsqrt()
            x = F.conv2d(x, w, self.project.bias, padding=1)
        else:
            x = self.project(x)
        x = self.norm(x)
        if scale_shift is not None:
            x = x * (scale_shift[0] + 1) + scale_shift[1]
        return F.silu(x)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, cosine_sim: bool, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.heads, self.dim_head, self.cosine_sim = heads, dim_head, cosine_sim
        self.scale = 16.0 if cosine_sim else dim_head**-0.5
        inner = dim_head * heads
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.zeros(2, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), LayerNorm(dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # x: [B, N, C]; context: [B, M, Cc]
        b, n, _ = x.shape
        split = lambda t: t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # [B, H, *, Dh]
        q = split(self.to_q(self.norm(x)))
        k, v = map(split, self.to_kv(context).chunk(2, dim=-1))
        nk, nv = (t.to(x.dtype).expand(b, self.heads, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((nk, k), dim=2), torch.cat((nv, v), dim=2)
        if self.cosine_sim:
            q, k = l2norm(q), l2norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int, groups: int, p: UnetParams, cond_dim: int | None = None):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, dim_out * 2))
        self.cross_attn = CrossAttention(dim_out, cond_dim, p.cosine_sim_cross_attn) if cond_dim else None
        self.block1 = Block(dim, dim_out, groups, p.resnet_weight_standardization)
        self.block2 = Block(dim_out, dim_out, groups, p.resnet_weight_standardization)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        scale_shift = self.time_mlp(t)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift)
        if self.cross_attn is not None:
            b, c, hh, ww = h.shape
            seq = h.flatten(2).transpose(1, 2)  # [B, HW, C]
            seq = self.cross_attn(seq, cond) + seq
            h = seq.transpose(1, 2).reshape(b, c, hh, ww)
        return self.block2(h) + self.res_conv(x)


class Wrap(nn.Module):
    """Keeps the reference's `.fn` nesting in parameter names."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn


class SelfAttention2d(nn.Module):
    def __init__(self, dim: int, p: UnetParams):
        super().__init__()
        self.fn = Wrap(NullKVAttention(dim, p.attn_dim_head, p.attn_heads, cosine_sim=p.cosine_sim_self_attn,
                                       legacy=p.legacy_attention))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        seq = self.fn.fn(seq) + seq
        return seq.transpose(1, 2).reshape(b, c, h, w)


class LinearAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int, legacy: bool = False):
        super().__init__()
        self.heads, self.scale, self.legacy = heads, dim_head**-0.5, legacy
        inner = dim_head * heads
        self.norm = LayerNorm(dim, channel_dim=1)
        self.to_qkv = nn.Conv2d(dim, inner * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner, dim, 1, bias=False), LayerNorm(dim, channel_dim=1))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b * self.heads, -1, h * w).transpose(1, 2) for t in qkv)  # [BH, N, Dh]
        q = q.softmax(dim=-1) * self.scale
        k = k.softmax(dim=-2)
        if not self.legacy:  # dalle2-pytorch >= 1.4.0 rescales for fp16
            k, v = k / math.sqrt(h * w), l2norm(v) / math.sqrt(h * w)
        out = q @ (k.transpose(1, 2) @ v)  # [BH, N, Dh]
        out = out.transpose(1, 2).reshape(b, -1, h, w)
        return self.to_out(F.gelu(out))


class LinearAttention2d(nn.Module):
    def __init__(self, dim: int, p: UnetParams):
        super().__init__()
        self.fn = LinearAttention(dim, p.attn_dim_head, p.attn_heads, legacy=p.legacy_linear_attention)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class CrossEmbed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, kernel_sizes: tuple[int, ...]):
        super().__init__()
        ks = sorted(kernel_sizes)
        dims = [int(dim_out / 2**i) for i in range(1, len(ks))]
        dims.append(dim_out - sum(dims))
        self.convs = nn.ModuleList(nn.Conv2d(dim_in, d, k, padding=(k - 1) // 2) for k, d in zip(ks, dims))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def downsample(dim: int, dim_out: int, kind: str) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(dim, dim_out, 4, stride=2, padding=1)
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(dim * 4, dim_out, 1))


class PixelShuffleUpsample(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(dim, dim_out * 4, 1), nn.SiLU(), nn.PixelShuffle(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def upsample(dim: int, dim_out: int, pixel_shuffle: bool) -> nn.Module:
    if pixel_shuffle:
        return PixelShuffleUpsample(dim, dim_out)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))
