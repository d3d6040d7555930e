"""Beta schedules and the derived diffusion coefficients (float64 math, stored as float32)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


def betas_for(kind: str, timesteps: int) -> Tensor:
    scale = 1000 / timesteps
    lo, hi = scale * 1e-4, scale * 0.02
    if kind == "cosine":
        s = 0.008
        x = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
        ac = torch.cos(((x / timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
        ac = ac / ac[0]
        return torch.clip(1 - ac[1:] / ac[:-1], 0, 0.999)
    if kind == "linear":
        return torch.linspace(lo, hi, timesteps, dtype=torch.float64)
    if kind == "quadratic":
        return torch.linspace(lo**0.5, hi**0.5, timesteps, dtype=torch.float64) ** 2
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=torch.float64)) * (hi - lo) + lo
    if kind == "jsd":
        return 1.0 / torch.linspace(timesteps, 1, timesteps)
    raise ValueError(f"unknown beta schedule {kind!r} (cosine, linear, quadratic, sigmoid, jsd)")


@dataclass
class Schedule:
    betas: Tensor
    log_betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device) -> Schedule:
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def make_schedule(kind: str, timesteps: int) -> Schedule:
    betas = betas_for(kind, timesteps)
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    f32 = lambda t: t.to(torch.float32)
    return Schedule(
        betas=f32(betas),
        log_betas=torch.log(f32(betas)),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(torch.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(torch.sqrt(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(torch.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(torch.sqrt(1.0 / ac - 1)),
        posterior_log_variance_clipped=f32(torch.log(post_var.clamp(min=1e-20))),
        posterior_mean_coef1=f32(betas * torch.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)),
    )


# names of the checkpoint buffers a Schedule can be checked against
CHECKED_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_mean_coef1", "posterior_mean_coef2")


def check_against_buffers(s: Schedule, buffers: dict[str, Tensor], where: str) -> None:
    """Raise if a checkpoint's stored noise-scheduler buffers disagree with the configured schedule."""
    for name in CHECKED_BUFFERS:
        if name not in buffers or buffers[name].is_meta:
            continue
        ref = buffers[name].float().cpu()
        if ref.shape != getattr(s, name).shape or not torch.allclose(ref, getattr(s, name), rtol=1e-4, atol=1e-6, equal_nan=True):
            raise ValueError(f"{where}: stored {name} does not match the configured beta schedule / timesteps")
