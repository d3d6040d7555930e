"""Input image rules of BAGEL's edit and understand tasks.

An input is made RGB (alpha composited on white), resized by the VAE rule (long side <=
max, short side >= min, multiples of stride; bicubic with antialias), and that image
feeds both the VAE (resized by the VAE rule again, a no-op for ordinary sizes) and the
ViT (resized by the ViT rule). Values are normalised to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MAX_PIXELS = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class ResizeRule:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = MAX_PIXELS


VAE_RULE = ResizeRule(1024, 512, 16)
VIT_RULE = ResizeRule(980, 224, 14)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.split()[3])
        return out
    return img.convert("RGB")


def _scaled(w: int, h: int, scale: float, stride: int) -> tuple[int, int]:
    def snap(v: float) -> int:
        return max(stride, int(round(v / stride) * stride))

    return snap(round(w * scale)), snap(round(h * scale))


def resized_size(width: int, height: int, rule: ResizeRule) -> tuple[int, int]:
    """(width, height) after the resize rule."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(rule.max_size / max(width, height), 1.0)
    scale = max(scale, rule.min_size / min(width, height))
    w, h = _scaled(width, height, scale, rule.stride)
    if w * h > rule.max_pixels:
        w, h = _scaled(w, h, rule.max_pixels / (w * h), rule.stride)
    if max(w, h) > rule.max_size:
        w, h = _scaled(w, h, rule.max_size / max(w, h), rule.stride)
    return w, h


def resize(img: Image.Image, rule: ResizeRule) -> Image.Image:
    size = resized_size(*img.size, rule)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def patchify(x: Tensor, p: int) -> Tensor:
    """[C, H, W] -> [(H/p) * (W/p), p * p * C], patch values in (row, col, channel) order."""
    c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of patch {p}")
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)


def unpatchify(x: Tensor, h: int, w: int, p: int) -> Tensor:
    """[h * w, p * p * C] -> [C, h * p, w * p] (inverse of patchify)."""
    c = x.shape[-1] // (p * p)
    return x.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def grid_ids(rows: int, cols: int, side: int) -> Tensor:
    """Position ids of a rows x cols grid in a side x side table: row * side + col."""
    if rows > side or cols > side:
        raise ValueError(f"grid {rows}x{cols} exceeds the {side}x{side} position table")
    return (torch.arange(rows)[:, None] * side + torch.arange(cols)[None, :]).flatten()


@dataclass
class PreparedImage:
    vae_pixels: Tensor  # [3, H, W] in [-1, 1]; H, W also the edit output size
    vit_patches: Tensor  # [hp * wp, 3 * p * p]
    vit_grid: tuple[int, int]  # (hp, wp)


def prepare_image(
    img: Image.Image, vae_rule: ResizeRule = VAE_RULE, vit_rule: ResizeRule = VIT_RULE, vae: bool = True
) -> PreparedImage:
    base = resize(to_rgb(img), vae_rule)
    vae_pixels = to_tensor(resize(base, vae_rule)) if vae else torch.empty(0)
    vit_img = resize(base, vit_rule)
    p = vit_rule.stride
    return PreparedImage(vae_pixels, patchify(to_tensor(vit_img), p), (vit_img.height // p, vit_img.width // p))
