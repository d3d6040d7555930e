"""Decoder unets (base unet and upsamplers) in the DALLE2-pytorch layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import CrossEmbed, LinearAttention2d, ResnetBlock, SelfAttention2d, downsample, upsample
from .layers import sinusoidal_embedding


@dataclass
class UnetParams:
    dim: int
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    image_embed_dim: int | None = None
    text_embed_dim: int | None = None
    cond_dim: int | None = None
    num_image_tokens: int = 4
    num_time_tokens: int = 2
    channels: int = 3
    channels_out: int | None = None
    self_attn: tuple[bool, ...] | bool = False
    attn_dim_head: int = 32
    attn_heads: int = 16
    lowres_cond: bool = False
    lowres_noise_cond: bool = False
    sparse_attn: bool = False
    cosine_sim_cross_attn: bool = False
    cosine_sim_self_attn: bool = False
    cond_on_text_encodings: bool = False
    max_text_len: int = 256
    cond_on_image_embeds: bool = False
    add_image_embeds_to_time: bool = True
    init_dim: int | None = None
    init_conv_kernel_size: int = 7
    resnet_groups: tuple[int, ...] | int = 8
    resnet_weight_standardization: bool = False
    num_resnet_blocks: tuple[int, ...] | int = 2
    init_cross_embed: bool = True
    init_cross_embed_kernel_sizes: tuple[int, ...] = (3, 7, 15)
    memory_efficient: bool = False
    scale_skip_connection: bool = False
    pixel_shuffle_upsample: bool = True
    final_conv_kernel_size: int = 1
    downsample: str = "unshuffle"  # "unshuffle" (>= 1.10) or "conv" (Conv2d k4 s2, LAION releases)
    legacy_attention: bool = False  # self-attention as dalle2-pytorch < 1.4.3 (q.k / sqrt(d))
    legacy_linear_attention: bool = False  # linear attention as dalle2-pytorch < 1.4.0 (no v l2norm / 1/sqrt(n))

    def __post_init__(self):
        n = len(self.dim_mults)
        as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
        self.dim_mults = tuple(self.dim_mults)
        self.self_attn, self.resnet_groups = as_tuple(self.self_attn), as_tuple(self.resnet_groups)
        self.num_resnet_blocks = as_tuple(self.num_resnet_blocks)
        self.init_cross_embed_kernel_sizes = tuple(self.init_cross_embed_kernel_sizes)
        self.cond_dim = self.cond_dim or self.dim
        self.init_dim = self.init_dim or self.dim
        self.channels_out = self.channels_out or self.channels
        for name in ("self_attn", "resnet_groups", "num_resnet_blocks"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"unet {name}={getattr(self, name)} needs {n} entries (dim_mults={self.dim_mults})")
        if self.downsample not in ("unshuffle", "conv"):
            raise ValueError(f"unet downsample must be 'unshuffle' or 'conv', got {self.downsample!r}")
        if self.cond_on_text_encodings and not self.text_embed_dim:
            raise ValueError("unet cond_on_text_encodings needs text_embed_dim")
        if self.cond_on_image_embeds and not self.image_embed_dim:
            raise ValueError("unet cond_on_image_embeds needs image_embed_dim")
        if self.cond_on_image_embeds and self.image_embed_dim == self.cond_dim:
            raise ValueError(f"image_embed_dim == cond_dim ({self.cond_dim}) is not supported")


class Unet(nn.Module):
    def __init__(self, p: UnetParams):
        super().__init__()
        self.params = p
        dim, cond_dim, tdim = p.dim, p.cond_dim, p.dim * 4
        in_ch = p.channels * (2 if p.lowres_cond else 1)
        if p.init_cross_embed:
            self.init_conv = CrossEmbed(in_ch, p.init_dim, p.init_cross_embed_kernel_sizes)
        else:
            k = p.init_conv_kernel_size
            self.init_conv = nn.Conv2d(in_ch, p.init_dim, k, padding=k // 2)
        dims = [p.init_dim, *(dim * m for m in p.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n = len(in_out)

        self.to_time_hiddens = nn.Sequential(nn.Identity(), nn.Linear(dim, tdim), nn.GELU())
        self.to_time_tokens = nn.Sequential(nn.Linear(tdim, cond_dim * p.num_time_tokens))
        self.to_time_cond = nn.Sequential(nn.Linear(tdim, tdim))
        has_img = p.cond_on_image_embeds
        self.image_to_tokens = nn.Sequential(nn.Linear(p.image_embed_dim, cond_dim * p.num_image_tokens)) if has_img else None
        self.to_image_hiddens = (
            nn.Sequential(nn.Linear(p.image_embed_dim, tdim), nn.GELU()) if has_img and p.add_image_embeds_to_time else None
        )
        self.norm_cond = nn.LayerNorm(cond_dim)
        self.norm_mid_cond = nn.LayerNorm(cond_dim)
        self.text_to_cond = nn.Linear(p.text_embed_dim, cond_dim) if p.cond_on_text_encodings else None
        self.to_lowres_noise_cond = (
            nn.Sequential(nn.Identity(), nn.Linear(dim, tdim), nn.GELU(), nn.Linear(tdim, tdim)) if p.lowres_noise_cond else None
        )
        self.null_image_embed = nn.Parameter(torch.zeros(1, p.num_image_tokens, cond_dim))
        self.null_image_hiddens = nn.Parameter(torch.zeros(1, tdim))
        self.null_text_embed = nn.Parameter(torch.zeros(1, p.max_text_len, cond_dim))
        self.skip_scale = 2**-0.5 if p.scale_skip_connection else 1.0

        def attention(d: int, full: bool) -> nn.Module:
            if full:
                return SelfAttention2d(d, p)
            return LinearAttention2d(d, p) if p.sparse_attn else nn.Identity()

        me = p.memory_efficient
        block = lambda a, b, g, c=None: ResnetBlock(a, b, tdim, g, p, cond_dim=c)
        g0 = p.resnet_groups[0]
        self.init_resnet_block = block(p.init_dim, p.init_dim, g0) if me else None
        self.downs = nn.ModuleList()
        skip_dims = []
        for i, ((d_in, d_out), g, nb, sa) in enumerate(zip(in_out, p.resnet_groups, p.num_resnet_blocks, p.self_attn)):
            last = i == n - 1
            d = d_out if me else d_in
            skip_dims.append(d)
            post = downsample(d, d_out, p.downsample) if not last and not me else nn.Conv2d(d, d_out, 1)
            self.downs.append(nn.ModuleList([
                downsample(d_in, d_out, p.downsample) if me else nn.Identity(),
                block(d, d, g),
                nn.ModuleList(block(d, d, g, cond_dim if i > 0 else None) for _ in range(nb)),
                attention(d, sa),
                post,
            ]))
        mid = dims[-1]
        self.mid_block1 = block(mid, mid, p.resnet_groups[-1], cond_dim)
        self.mid_attn = SelfAttention2d(mid, p)
        self.mid_block2 = block(mid, mid, p.resnet_groups[-1], cond_dim)
        self.ups = nn.ModuleList()
        rev = zip(reversed(in_out), reversed(p.resnet_groups), reversed(p.num_resnet_blocks), reversed(p.self_attn))
        for i, ((d_in, d_out), g, nb, sa) in enumerate(rev):
            last = i == n - 1
            c = cond_dim if not last else None
            skip = skip_dims.pop()
            self.ups.append(nn.ModuleList([
                block(d_out + skip, d_out, g, c),
                nn.ModuleList(block(d_out + skip, d_out, g, c) for _ in range(nb)),
                attention(d_out, sa),
                upsample(d_out, d_in, p.pixel_shuffle_upsample) if not last or me else nn.Identity(),
            ]))
        self.final_resnet_block = block(dim * 2, dim, g0)
        k = p.final_conv_kernel_size
        self.to_out = nn.Conv2d(dim + (p.channels if p.lowres_cond else 0), p.channels_out, k, padding=k // 2)

    def forward(self, x: Tensor, time: Tensor, *, image_embed: Tensor | None, text_encodings: Tensor | None,
                drop: Tensor, lowres_cond_img: Tensor | None = None, lowres_noise_level: Tensor | None = None) -> Tensor:
        # x: [B, C, H, W]; time: [B]; image_embed: [B, Di]; text_encodings: [B, T, Dt] (zero rows = padding)
        # drop: [B] bool, True = classifier-free-guidance null branch; lowres_cond_img: [B, C, H, W] in [-1, 1]
        p = self.params
        b = x.shape[0]
        if p.lowres_cond:
            if lowres_cond_img is None:
                raise ValueError("this unet needs lowres_cond_img")
            x = torch.cat((x, lowres_cond_img), dim=1)
        x = self.init_conv(x)
        r = x.clone()
        th = self.to_time_hiddens(sinusoidal_embedding(time.to(x.dtype), p.dim))  # [B, 4*dim]
        time_tokens = self.to_time_tokens(th).view(b, p.num_time_tokens, p.cond_dim)
        t = self.to_time_cond(th)
        if lowres_noise_level is not None:
            if self.to_lowres_noise_cond is None:
                raise ValueError("lowres_noise_level given to a unet trained without lowres_noise_cond")
            t = t + self.to_lowres_noise_cond(sinusoidal_embedding(lowres_noise_level.to(x.dtype), p.dim))
        keep = ~drop
        c = time_tokens
        if self.to_image_hiddens is not None:
            t = t + torch.where(keep[:, None], self.to_image_hiddens(image_embed), self.null_image_hiddens.to(x.dtype))
        if self.image_to_tokens is not None:
            img_tok = self.image_to_tokens(image_embed).view(b, p.num_image_tokens, p.cond_dim)
            c = torch.cat((c, torch.where(keep[:, None, None], img_tok, self.null_image_embed.to(x.dtype))), dim=1)
        mid_c = c
        if text_encodings is not None and self.text_to_cond is not None:
            L = p.max_text_len
            mask = (text_encodings != 0).any(dim=-1)[:, :L]
            txt = self.text_to_cond(text_encodings)[:, :L]
            txt = F.pad(txt, (0, 0, 0, L - txt.shape[1]))
            mask = F.pad(mask, (0, L - mask.shape[1]), value=False)
            txt = torch.where((mask & keep[:, None])[..., None], txt, self.null_text_embed.to(x.dtype))
            mid_c = torch.cat((c, txt), dim=1)
        c, mid_c = self.norm_cond(c), self.norm_mid_cond(mid_c)

        if self.init_resnet_block is not None:
            x = self.init_resnet_block(x, t)
        hiddens = []
        for pre, init_block, blocks, attn, post in self.downs:
            x = init_block(pre(x), t, c)
            for blk in blocks:
                x = blk(x, t, c)
                hiddens.append(x)
            x = attn(x)
            hiddens.append(x)
            x = post(x)
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t, mid_c)), t, mid_c)
        for init_block, blocks, attn, up in self.ups:
            x = init_block(torch.cat((x, hiddens.pop() * self.skip_scale), dim=1), t, c)
            for blk in blocks:
                x = blk(torch.cat((x, hiddens.pop() * self.skip_scale), dim=1), t, c)
            x = up(attn(x))
        x = self.final_resnet_block(torch.cat((x, r), dim=1), t)
        if lowres_cond_img is not None:
            x = torch.cat((x, lowres_cond_img), dim=1)
        return self.to_out(x)
