"""The decoder: a cascade of unets with per-unet diffusion settings."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .unet import Unet, UnetParams


@dataclass
class DecoderParams:
    unets: list[UnetParams]
    image_sizes: list[int]
    timesteps: int = 1000
    beta_schedule: list[str] | None = None  # default: cosine for all but the last, linear for the last upsampler
    learned_variance: list[bool] | None = None  # default: first unet only
    predict_x_start: list[bool] | None = None
    predict_v: list[bool] | None = None
    sample_timesteps: list[int | None] | None = None
    use_noise_for_lowres_cond: list[bool] | None = None  # per unet; entry 0 is always False
    lowres_noise_sample_level: float = 0.2
    image_cond_drop_prob: float = 0.1
    text_cond_drop_prob: float = 0.5
    clip_denoised: bool = True
    use_dynamic_thres: bool = False
    dynamic_thres_percentile: float = 0.95
    ddim_sampling_eta: float = 0.0
    channels: int = 3

    def __post_init__(self):
        n = len(self.unets)
        if n == 0:
            raise ValueError("a decoder needs at least one unet")
        if len(self.image_sizes) != n or list(self.image_sizes) != sorted(set(self.image_sizes)):
            raise ValueError(f"image_sizes {self.image_sizes} must be {n} increasing sizes, one per unet")

        def per_unet(name, value, default):
            if value is None:
                value = default
            if not isinstance(value, (list, tuple)):
                value = [value] * n
            value = list(value) + [default[-1] if isinstance(default, list) else default] * (n - len(value))
            if len(value) != n:
                raise ValueError(f"decoder {name}={value} has more entries than unets ({n})")
            return value

        sched_default = ["cosine"] * max(n - 1, 1) + (["linear"] if n > 1 else [])
        if self.beta_schedule is None:
            self.beta_schedule = sched_default
        self.beta_schedule = per_unet("beta_schedule", self.beta_schedule, "cosine")
        lv = self.learned_variance  # a bare bool means the first unet only (reference pads with False)
        lv = [True] if lv is None else [lv] if isinstance(lv, bool) else lv
        self.learned_variance = per_unet("learned_variance", lv, False)
        self.predict_x_start = per_unet("predict_x_start", self.predict_x_start, False)
        self.predict_v = per_unet("predict_v", self.predict_v, False)
        self.sample_timesteps = per_unet("sample_timesteps", self.sample_timesteps, None)
        noise = self.use_noise_for_lowres_cond
        if noise is None or isinstance(noise, bool):
            noise = [False] + [bool(noise)] * (n - 1)
        elif len(noise) < n:
            noise = [False, *noise]
        self.use_noise_for_lowres_cond = per_unet("use_noise_for_lowres_cond", noise, False)
        for i, s in enumerate(self.sample_timesteps):
            if s is not None and not 0 < s <= self.timesteps:
                raise ValueError(f"unet {i + 1}: sample_timesteps={s} must be in 1..{self.timesteps}")
        for i, u in enumerate(self.unets):
            if u.lowres_cond != (i > 0):
                raise ValueError(f"unet {i + 1}: lowres_cond must be {i > 0}")

    @property
    def can_guide(self) -> bool:
        return self.image_cond_drop_prob > 0 or self.text_cond_drop_prob > 0


class Decoder(nn.Module):
    """Holds the unets this process needs (others stay None) under `unets.{i}`."""

    def __init__(self, p: DecoderParams, unet_numbers: list[int] | None = None):
        super().__init__()
        self.params = p
        wanted = set(unet_numbers or range(1, len(p.unets) + 1))
        self.unets = nn.ModuleList(Unet(u) if i + 1 in wanted else None for i, u in enumerate(p.unets))
