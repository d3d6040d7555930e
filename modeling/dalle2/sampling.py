"""Samplers (free functions): prior DDPM/DDIM with reranking, decoder DDPM/DDIM with RePaint.

Every random draw goes through a noise source `noise(shape) -> Tensor`, called with the
un-doubled batch shape. `per_sample_noise` builds one from per-sample generators so that a
sample's draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .decoder import DecoderParams
from .layers import l2norm
from .prior import DiffusionPriorNetwork, PriorParams
from .schedule import Schedule, make_schedule
from .unet import Unet

Noise = Callable[[tuple[int, ...]], Tensor]


def per_sample_noise(generators: list[torch.Generator], device="cpu", dtype=torch.float32, pinned: bool = True) -> Noise:
    """Rows are split evenly among the generators, in order (sample i owns rows i*k..(i+1)*k-1).
    CPU draws bound for a CUDA device travel through pinned memory without a stream sync
    (pinned=False: a plain copy, which waits for the GPU's queued work), so the host can queue
    the next denoising step while the GPU runs this one; the values are the same either way."""

    def draw(shape: tuple[int, ...]) -> Tensor:
        if shape[0] % len(generators):
            raise ValueError(f"noise batch {shape[0]} not divisible by {len(generators)} samples")
        k = shape[0] // len(generators)
        parts = [torch.randn((k, *shape[1:]), generator=g, device=g.device) for g in generators]
        out = torch.cat(parts)
        if pinned and out.device.type == "cpu" and torch.device(device).type == "cuda":
            return out.pin_memory().to(device, non_blocking=True).to(dtype)
        return out.to(device=device, dtype=dtype)

    return draw


def replay_noise(tensors: Iterable[Tensor]) -> Noise:
    """Hands out recorded draws in order (parity kits); a shape mismatch or running dry raises."""
    it = iter(tensors)

    def draw(shape: tuple[int, ...]) -> Tensor:
        t = next(it, None)
        if t is None:
            raise ValueError(f"noise stream exhausted (wanted {tuple(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"noise stream gave {tuple(t.shape)}, sampler wanted {tuple(shape)}")
        return t

    return draw


def ddim_pairs(total: int, steps: int, start: float) -> list[tuple[int, int]]:
    # prior: start=-1 (last pair ends at -1); decoder: start=0
    extra = 1 if start < 0 else 2
    times = torch.linspace(start, total, steps=steps + extra)[:-1].int().tolist()[::-1]
    return [(a, b) for a, b in zip(times[:-1], times[1:]) if a > b]


def _guided(fn: Callable[..., Tensor], x: Tensor, cond_scale: float, dtype: torch.dtype, **cond) -> Tensor:
    """One forward for both guidance branches: batch [cond; null], then null + (cond - null) * scale.
    The model runs in `dtype`; the sampler's arithmetic stays in x's dtype (float32)."""
    b = x.shape[0]
    cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t
    cond = {k: cast(v) for k, v in cond.items()}
    if cond_scale == 1:
        return fn(cast(x), drop=torch.zeros(b, dtype=torch.bool, device=x.device), **cond).to(x.dtype)
    two = lambda t: None if t is None else torch.cat((t, t))
    drop = torch.arange(2 * b, device=x.device) >= b  # made on the device: no host copy, no sync
    out = fn(two(cast(x)), drop=drop, **{k: two(v) for k, v in cond.items()}).to(x.dtype)
    c, u = out.chunk(2)
    return u + (c - u) * cond_scale


def _x_start(s: Schedule, x: Tensor, t: int, pred: Tensor, predict_x_start: bool, predict_v: bool) -> Tensor:
    if predict_v:
        return s.sqrt_alphas_cumprod[t] * x - s.sqrt_one_minus_alphas_cumprod[t] * pred
    if predict_x_start:
        return pred
    return s.sqrt_recip_alphas_cumprod[t] * x - s.sqrt_recipm1_alphas_cumprod[t] * pred


def _noise_from_x_start(s: Schedule, x: Tensor, t: int, x0: Tensor) -> Tensor:
    return (s.sqrt_recip_alphas_cumprod[t] * x - x0) / s.sqrt_recipm1_alphas_cumprod[t]


def _ddim_update(x0: Tensor, eps: Tensor, a: Tensor, a_next: Tensor, eta: float, noise: Tensor | float) -> Tensor:
    c1 = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
    c2 = ((1 - a_next) - c1**2).sqrt()
    return x0 * a_next.sqrt() + c1 * noise + c2 * eps


# ---------------------------------------------------------------- prior


def sample_prior(model: DiffusionPriorNetwork, text_embed: Tensor, text_encodings: Tensor | None, noise: Noise, *,
                 steps: int | None = None, cond_scale: float = 1.0, eta: float = 1.0,
                 num_samples_per_batch: int = 1) -> Tensor:
    """text_embed: [B, D], text_encodings: [B, T, D] -> image_embed [B, D] (unscaled, as CLIP's)."""
    p: PriorParams = model.params
    total = p.timesteps
    steps = steps or p.sample_timesteps or total
    if not 0 < steps <= total:
        raise ValueError(f"prior steps={steps} must be in 1..{total}")
    if cond_scale != 1 and not (p.guidance_trained and p.cond_drop_prob > 0):
        raise ValueError(f"prior cond_scale={cond_scale}: this prior was not trained for classifier-free guidance; use 1")
    if not p.condition_on_text_encodings:
        text_encodings = None
    r = num_samples_per_batch
    te = text_embed.repeat_interleave(r, dim=0)
    enc = None if text_encodings is None else text_encodings.repeat_interleave(r, dim=0)
    s = make_schedule(p.beta_schedule, total).to(te.device)
    scale = p.image_embed_scale
    b, d = te.shape
    x = noise((b, d)).to(te.device, torch.float32)
    if p.init_image_embed_l2norm:
        x = l2norm(x) * scale
    mdtype = model.learned_query.dtype
    te, enc = te.float(), None if enc is None else enc.float()
    net = lambda x_, t_, **c: _guided(model, x_, cond_scale, mdtype, t=torch.full((x_.shape[0],), t_, device=x_.device),
                                      **c)

    def x0_of(x, t):
        pred = net(x, t, text_embed=te, text_encodings=enc)
        x0 = _x_start(s, x, t, pred, p.predict_x_start, p.predict_v)
        if not p.predict_x_start:
            x0 = x0.clamp(-1.0, 1.0)
        elif p.sampling_clamp_l2norm:
            x0 = l2norm(x0) * scale
        return x0

    if steps == total:  # DDPM
        for t in reversed(range(total)):
            x0 = x0_of(x, t)
            mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
            z = noise((b, d)).to(x)
            x = mean + (t > 0) * (0.5 * s.posterior_log_variance_clipped[t]).exp() * z
    else:  # DDIM over alphas_cumprod_prev, as the reference does
        ac = s.alphas_cumprod_prev
        for t, t_next in ddim_pairs(total, steps, start=-1.0):
            x0 = x0_of(x, t)
            eps = _noise_from_x_start(s, x, t, x0)
            if t_next < 0:
                x = x0
                continue
            z = noise((b, d)).to(x) if t_next > 0 else 0.0
            x = _ddim_update(x0, eps, ac[t], ac[t_next], eta, z)
    if p.predict_x_start and p.sampling_final_clamp_l2norm:
        x = l2norm(x) * scale
    x = x / scale
    if r == 1:
        return x
    sims = (l2norm(te) * l2norm(x)).sum(-1).view(-1, r)  # [B, r]
    best = sims.argmax(dim=1)
    return x.view(-1, r, d)[torch.arange(best.shape[0], device=x.device), best]


# ---------------------------------------------------------------- decoder


def _resize_nearest(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size, mode="nearest")


def _threshold(p: DecoderParams, x0: Tensor) -> Tensor:
    if not p.clip_denoised:
        return x0
    if not p.use_dynamic_thres:
        return x0.clamp(-1.0, 1.0)
    q = torch.quantile(x0.flatten(1).abs().float(), p.dynamic_thres_percentile, dim=-1).clamp(min=1.0)
    q = q.to(x0).view(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-q, q) / q


def _q_sample(s: Schedule, x0: Tensor, t: int, z: Tensor) -> Tensor:
    return s.sqrt_alphas_cumprod[t] * x0 + s.sqrt_one_minus_alphas_cumprod[t] * z


def _renoise(s: Schedule, x: Tensor, t_from: int, t_to: int, z: Tensor) -> Tensor:
    # RePaint: jump from t_from back up to t_to (the reference's q_sample_from_to)
    a, sg = s.sqrt_alphas_cumprod[t_from], s.sqrt_one_minus_alphas_cumprod[t_from]
    an, sn = s.sqrt_alphas_cumprod[t_to], s.sqrt_one_minus_alphas_cumprod[t_to]
    return x * (an / a) + z * (sn * a - sg * an) / a


def sample_unet(unet: Unet, p: DecoderParams, unet_number: int, image_embed: Tensor | None,
                text_encodings: Tensor | None, noise: Noise, *, prev_image: Tensor | None = None,
                steps: int | None = None, cond_scale: float = 1.0, eta: float | None = None,
                inpaint_image: Tensor | None = None, inpaint_mask: Tensor | None = None,
                inpaint_resample_times: int = 5, lowres_noise_level: float | None = None) -> Tensor:
    """One unet of the cascade. prev_image: [B, C, h, w] in [0, 1] (upsamplers);
    inpaint_image: [B, C, H, W] in [0, 1], inpaint_mask: [B, H, W] bool, True = keep these pixels.
    Returns [B, C, S, S] in [0, 1], unclamped."""
    i = unet_number - 1
    if not 0 <= i < len(p.unets):
        raise ValueError(f"unet_number={unet_number} not in 1..{len(p.unets)}")
    up = unet.params
    size, total = p.image_sizes[i], p.timesteps
    steps = steps or p.sample_timesteps[i] or total
    if not 0 < steps <= total:
        raise ValueError(f"unet {unet_number}: steps={steps} must be in 1..{total}")
    if cond_scale != 1 and not p.can_guide:
        raise ValueError(f"unet {unet_number}: cond_scale={cond_scale} but the decoder was trained without cond dropout")
    eta = p.ddim_sampling_eta if eta is None else eta
    ref = image_embed if image_embed is not None else prev_image
    device, dtype, mdtype = ref.device, torch.float32, unet.to_out.weight.dtype
    prev_image = None if prev_image is None else prev_image.float()
    b = ref.shape[0]
    s = make_schedule(p.beta_schedule[i], total).to(device)
    lowres = level = None
    if up.lowres_cond:
        if prev_image is None:
            raise ValueError(f"unet {unet_number} is an upsampler and needs prev_image")
        lowres = prev_image
        if lowres.shape[-1] != size:
            lowres = F.interpolate(lowres, size, mode="nearest").clamp(0.0, 1.0)
        if p.use_noise_for_lowres_cond[i]:
            lvl = int((p.lowres_noise_sample_level if lowres_noise_level is None else lowres_noise_level) * 1000)
            aug = make_schedule("linear", 1000).to(device)
            z = noise(tuple(lowres.shape)).to(lowres)
            lowres = (_q_sample(aug, lowres * 2 - 1, lvl, z) + 1) * 0.5
            level = torch.full((b,), lvl, device=device, dtype=torch.long)
        lowres = lowres * 2 - 1
    if not up.cond_on_text_encodings:
        text_encodings = None
    cond = dict(image_embed=image_embed if up.cond_on_image_embeds else None, text_encodings=text_encodings,
                lowres_cond_img=lowres, lowres_noise_level=level)
    shape = (b, up.channels, size, size)
    known = mask = None
    if inpaint_image is not None:
        if inpaint_mask is None:
            raise ValueError("inpaint_image needs inpaint_mask")
        known = _resize_nearest(inpaint_image.to(device, dtype) * 2 - 1, size)
        mask = _resize_nearest(inpaint_mask[:, None].to(device, dtype), size).bool()
    repeats = inpaint_resample_times if known is not None else 1

    def model_out(x, t):
        tt = torch.full((b,), t, device=device, dtype=torch.long)
        return _guided(lambda x_, drop, **c: unet(x_, c.pop("time"), drop=drop, **c), x, cond_scale, mdtype,
                       time=tt, **cond)

    def paste(x, t):
        return x * ~mask + _q_sample(s, known, t, noise(shape).to(x)) * mask

    x = noise(shape).to(device, dtype)
    if steps == total:  # DDPM
        for t in reversed(range(total)):
            for r in reversed(range(repeats)):
                if known is not None:
                    x = paste(x, t)
                out = model_out(x, t)
                pred, var = out.chunk(2, dim=1) if p.learned_variance[i] else (out, None)
                x0 = _threshold(p, _x_start(s, x, t, pred, p.predict_x_start[i], p.predict_v[i]))
                mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x
                logvar = s.posterior_log_variance_clipped[t]
                if var is not None:
                    frac = (var + 1) * 0.5
                    logvar = frac * s.log_betas[t] + (1 - frac) * logvar
                z = noise(shape).to(x)
                x = mean + (t > 0) * (0.5 * logvar).exp() * z
                if known is not None and not (t == 0 or r == 0):
                    x = _renoise(s, x, t - 1, t, noise(shape).to(x))
    else:  # DDIM
        ac = s.alphas_cumprod
        for t, t_next in ddim_pairs(total, steps, start=0.0):
            for r in reversed(range(repeats)):
                if known is not None:
                    x = paste(x, t)
                out = model_out(x, t)
                pred = out.chunk(2, dim=1)[0] if p.learned_variance[i] else out
                x0 = _threshold(p, _x_start(s, x, t, pred, p.predict_x_start[i], p.predict_v[i]))
                eps = _noise_from_x_start(s, x, t, x0)
                z = noise(shape).to(x) if t_next != 0 else 0.0
                x = _ddim_update(x0, eps, ac[t], ac[t_next], eta, z)
                if known is not None and not (t_next == 0 or r == 0):
                    x = _renoise(s, x, t_next, t, noise(shape).to(x))
    if known is not None:
        x = x * ~mask + known * mask
    return (x + 1) * 0.5


def sample_decoder(unets: list[Unet | None], p: DecoderParams, image_embed: Tensor, text_encodings: Tensor | None,
                   noise: Noise, *, cond_scale: float | list[float] = 1.0, steps: list[int | None] | None = None,
                   start_at_unet_number: int = 1, stop_at_unet_number: int | None = None,
                   image: Tensor | None = None, **kwargs) -> Tensor:
    """All unets in order (one process). image: [B, C, h, w] in [0, 1] when starting past unet 1."""
    n = len(p.unets)
    scales = cond_scale if isinstance(cond_scale, (list, tuple)) else [cond_scale] * n
    steps = steps or [None] * n
    img = image
    for number in range(start_at_unet_number, (stop_at_unet_number or n) + 1):
        img = sample_unet(unets[number - 1], p, number, image_embed, text_encodings, noise, prev_image=img,
                          steps=steps[number - 1], cond_scale=scales[number - 1], **kwargs)
    return img
