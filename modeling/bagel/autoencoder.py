"""The FLUX autoencoder (Black Forest Labs parameter names), as BAGEL uses it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], **factors) -> AutoEncoderParams:
        """Read the architecture off a state dict's tensor shapes."""
        ch = shapes["encoder.conv_in.weight"][0]
        levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels]
        return cls(
            in_channels=shapes["encoder.conv_in.weight"][1],
            ch=ch,
            out_ch=shapes["decoder.conv_out.weight"][0],
            ch_mult=ch_mult,
            num_res_blocks=len(blocks),
            z_channels=shapes["decoder.conv_in.weight"][1],
            **factors,
        )


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=hh, w=ww))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = p.ch
        for i, m in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(c, p.ch * m))
                c = p.ch * m
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        c = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        ups = []
        for i in reversed(range(len(p.ch_mult))):  # built from low resolution up
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, p.ch * p.ch_mult[i]))
                c = p.ch * p.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(c)
            ups.insert(0, level)  # up.{i} is indexed from high resolution (0) to low
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.params = p
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)

    def encode(self, x: Tensor, generators: list[torch.Generator] | None = None, sample: bool = True) -> Tensor:
        """x: [B, 3, H, W] in [-1, 1] -> scaled latents [B, z, H/8, W/8]: a posterior sample
        drawn with one CPU generator per image (the global RNG when None), or the mean."""
        mean, logvar = self.encoder(x.to(self.encoder.conv_in.weight.dtype)).float().chunk(2, dim=1)
        z = mean
        if sample:
            gens = generators if generators is not None else [None] * len(x)
            if len(gens) != len(x):
                raise ValueError(f"{len(gens)} generators for {len(x)} images")
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device)
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        z = z / self.params.scale_factor + self.params.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))
