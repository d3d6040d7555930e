"""Emu2-Gen / Emu1 diffusion sampling (free functions) over an EmuDecoder (decoder.py).

    denoise(dec, cond, uncond, *, height, width, steps, guidance, generators | noise) -> latents [B, 4, h, w]
    decode(dec, latents) -> (uint8 [B, H, W, 3], float [B, H, W, 3] in [0, 1])
    safety_inputs(dec, images) -> CLIP pixel values; safety_check(dec, images) -> list[bool] (flags only)
    decoder_case_errors(kit_dir, case, dec, cond, uncond) -> {"final_latent", "decoded", "pixels", ...}

Guidance as the references form it: the unet sees [cond rows; uncond rows of the guided rows] and
eps = uncond + s·(cond − uncond) on rows with s > 1; rows with s ≤ 1 take the cond prediction and
get no uncond pass (a batch where no row is guided runs cond only). Latents, guidance and the
scheduler run in float32; the unet and VAE in the load dtype. Emu2: Euler (leading spacing), added
conditions text_embeds = mean over the n embeddings and time_ids = original_size + crop + (h, w).
Emu1: PNDM (PLMS): n steps make n + 1 unet calls.

Randomness: `generators` (one per row: each row draws its own initial latent, so a row's result does
not depend on its batch) or `noise(shape) -> Tensor`, a source of draws in the reference's order
(Emu2: the initial latent, then one draw per Euler step that s_churn = 0 discards; Emu1: the
initial latent only); `replay_noise` builds one from recorded draws (the parity kits' noise_stream).

`decoder_case_errors` is what the parity command calls for a kit case once it has the LLM side's
cond / uncond ([1, n, d] each, uncond None without guidance): it replays the case's noise stream and
returns relative L2 errors of the final latent, the decoded image and the safety checker's input,
and the largest pixel difference against the case's output PNG.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from modeling.emu.decoder import DEFAULTS, EmuDecoder, load_decoder

__all__ = ["EmuDecoder", "load_decoder", "denoise", "decode", "safety_inputs", "safety_check", "replay_noise",
           "decoder_case_errors", "rel_l2"]

Noise = Callable[[tuple[int, ...]], Tensor]


def replay_noise(tensors: Iterable[Tensor]) -> Noise:
    """Hands out recorded draws in order; a shape mismatch or running dry raises."""
    it = iter(tensors)

    def draw(shape: tuple[int, ...]) -> Tensor:
        t = next(it, None)
        if t is None:
            raise ValueError(f"noise stream exhausted (wanted {tuple(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"noise stream gave {tuple(t.shape)}, sampler wanted {tuple(shape)}")
        return t

    return draw


def _initial_noise(shape, generators, noise, device) -> Tensor:
    if (generators is None) == (noise is None):
        raise ValueError("pass exactly one of generators (one per row) or noise")
    if noise is not None:
        x = noise(shape)
    else:
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for {shape[0]} rows")
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
                       for g in generators])
    return x.to(device=device, dtype=torch.float32)


def _guidance(guidance, batch: int, device) -> Tensor:
    g = torch.as_tensor(guidance, dtype=torch.float32).flatten().to(device)
    if g.numel() == 1:
        g = g.expand(batch)
    if g.numel() != batch:
        raise ValueError(f"guidance has {g.numel()} scales for {batch} rows")
    return g


@torch.inference_mode()
def denoise(dec: EmuDecoder, cond: Tensor, uncond: Tensor | None = None, *, height: int | None = None,
            width: int | None = None, steps: int | None = None, guidance: float | Tensor | Sequence[float] | None = None,
            generators: list[torch.Generator] | None = None, noise: Noise | None = None,
            original_size: tuple[int, int] = (1024, 1024), crop_info: tuple[int, int] = (0, 0),
            return_trace: bool = False):
    """cond, uncond: [B, n, d] (uncond may be [1, n, d], shared). Returns float32 latents [B, 4, H/8, W/8]
    (and a trace dict of every unet input/output and latent when return_trace)."""
    h0, w0, s0, g0 = DEFAULTS[dec.variant]
    height, width, steps = height or h0, width or w0, steps or s0
    guidance = g0 if guidance is None else guidance
    if cond.ndim != 3 or cond.shape[-1] != dec.context_dim:
        raise ValueError(f"cond must be [B, n, {dec.context_dim}], got {tuple(cond.shape)}")
    f = dec.vae_scale_factor
    if height <= 0 or width <= 0 or height % f or width % f:
        raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    B, device, dtype = cond.shape[0], dec.device, dec.dtype
    g = _guidance(guidance, B, device)
    guided = torch.nonzero(g > 1).flatten()
    ctx = cond
    if len(guided):
        if uncond is None:
            raise ValueError(f"guidance {g.tolist()} > 1 needs uncond")
        if uncond.shape[0] not in (1, B) or uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond must be [1 or {B}, {cond.shape[1]}, {cond.shape[2]}], got {tuple(uncond.shape)}")
        uncond = uncond.to(device).expand(B, -1, -1)
        ctx = torch.cat([cond.to(device), uncond[guided]])
    ctx = ctx.to(device=device, dtype=dtype)
    added = None
    if dec.variant == "emu2":
        ids = torch.tensor([*original_size, *crop_info, height, width], device=device)
        added = {"text_embeds": ctx.mean(dim=1), "time_ids": ids.expand(ctx.shape[0], -1)}

    sched = dec.make_scheduler()
    sched.set_timesteps(steps, device=device)
    shape = (B, dec.unet.config.in_channels, height // f, width // f)
    latents = _initial_noise(shape, generators, noise, device) * sched.init_noise_sigma
    euler = dec.variant == "emu2"
    trace = {"timesteps": sched.timesteps.clone(), "prompt_embeds": ctx, "unet_in": [], "unet_out": [],
             "latents": []}
    if euler:
        trace.update(sigmas=sched.sigmas.clone(), **added)
    for t in sched.timesteps:
        x = torch.cat([latents, latents[guided]]) if len(guided) else latents
        x = sched.scale_model_input(x, t)
        out = dec.unet(x.to(dtype), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float()
        eps = out[:B]
        if len(guided):
            c, u = eps[guided], out[B:]
            eps = eps.index_copy(0, guided, u + g[guided].view(-1, 1, 1, 1) * (c - u))
        if euler and noise is not None:
            noise(shape)  # the reference's per-step draw, unused with s_churn = 0
        latents = sched.step(eps, t, latents).prev_sample
        if return_trace:
            trace["unet_in"].append(x)
            trace["unet_out"].append(out)
            trace["latents"].append(latents)
    return (latents, trace) if return_trace else latents


@torch.inference_mode()
def decode(dec: EmuDecoder, latents: Tensor) -> tuple[Tensor, Tensor]:
    """VAE decode of `latents / scaling_factor`, then (x / 2 + 0.5).clamp(0, 1): (uint8, float32) [B, H, W, 3]."""
    z = (1 / dec.vae.config.scaling_factor) * latents.to(device=dec.vae.device, dtype=torch.float32)
    x = dec.vae.decode(z.to(dec.vae.dtype)).sample.float()
    img = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    return (img * 255).round().to(torch.uint8), img


def _size(v, square: bool) -> tuple[str, int | tuple[int, int]]:
    if isinstance(v, int):
        return ("square", (v, v)) if square else ("shortest_edge", v)
    if "shortest_edge" in v:
        return "shortest_edge", int(v["shortest_edge"])
    return "square", (int(v["height"]), int(v["width"]))


def safety_inputs(dec: EmuDecoder, images: Tensor) -> Tensor:
    """The CLIP image processor of feature_extractor/ on uint8 [B, H, W, 3] (float [0, 1] is rounded
    to uint8 first, as the reference converts to PIL): [B, 3, S, S] float32."""
    cfg = dec.feature_extractor
    if cfg is None:
        raise ValueError("decoder was loaded without feature_extractor/ (load_decoder(..., safety_checker=True))")
    if images.dtype != torch.uint8:
        images = (images.float() * 255).round().to(torch.uint8)
    rule, size = _size(cfg.get("size", 224), square=False)
    _, (ch, cw) = _size(cfg.get("crop_size", 224), square=True)
    mean = np.asarray(cfg.get("image_mean"), dtype=np.float32)
    std = np.asarray(cfg.get("image_std"), dtype=np.float32)
    out = []
    for arr in images.cpu().numpy():
        im = Image.fromarray(arr).convert("RGB")
        if cfg.get("do_resize", True):
            w, h = im.size
            if rule == "shortest_edge":
                short, long = min(w, h), max(w, h)
                new_long = int(size * long / short)
                nw, nh = (size, new_long) if w <= h else (new_long, size)
            else:
                nh, nw = size
            im = im.resize((nw, nh), resample=int(cfg.get("resample", 3)))
        x = np.asarray(im)
        if cfg.get("do_center_crop", True):
            top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
            if top < 0 or left < 0:
                raise ValueError(f"image {x.shape[:2]} is smaller than the crop {(ch, cw)}")
            x = x[top:top + ch, left:left + cw]
        x = (x.astype(np.float64) * cfg.get("rescale_factor", 1 / 255)).astype(np.float32) \
            if cfg.get("do_rescale", True) else x.astype(np.float32)
        if cfg.get("do_normalize", True):
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out).to(dec.device)


@torch.inference_mode()
def safety_check(dec: EmuDecoder, images: Tensor) -> list[bool]:
    """The SD safety checker's flags per image; the images are left as they are (the caller decides)."""
    if dec.safety_checker is None:
        raise ValueError("decoder was loaded without its safety checker (load_decoder(..., safety_checker=True))")
    pix = safety_inputs(dec, images).to(dec.safety_checker.dtype)
    _, flags = dec.safety_checker(clip_input=pix, images=torch.zeros(pix.shape[0], 1))
    return [bool(x) for x in flags]


def rel_l2(a: Tensor, b: Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def decoder_case_errors(kit_dir: str | Path, case: dict | str, dec: EmuDecoder, cond: Tensor,
                        uncond: Tensor | None) -> dict[str, float]:
    """Run a kit case's diffusion on (cond, uncond) with its recorded noise replayed. Returns relative L2
    errors `final_latent`, `decoded`, `safety_pixel_values` and `pixels` (max |Δ| vs the output PNG)."""
    kit_dir = Path(kit_dir)
    if isinstance(case, str):
        case = next((c for c in json.loads((kit_dir / "kit.json").read_text())["cases"] if c["id"] == case), None)
        if case is None:
            raise ValueError(f"{kit_dir}/kit.json has no case {case!r}")
    p, cid = case["params"], case["id"]
    with safe_open(str(kit_dir / "tensors.safetensors"), framework="pt") as f:
        draws = [f.get_tensor(n) for n in case["noise_stream"]]
        want = {k: f.get_tensor(f"{cid}.{k}") for k in ("final_latent", "decoded", "safety_pixel_values")
                if f"{cid}.{k}" in f.keys()}
    kw = {k: tuple(p[k]) for k in ("original_size", "crop_info") if k in p}
    latents = denoise(dec, cond, uncond if float(p["guidance_scale"]) > 1 else None, height=int(p["height"]),
                      width=int(p["width"]), steps=int(p["num_inference_steps"]), guidance=float(p["guidance_scale"]),
                      noise=replay_noise(draws), **kw)
    pixels, decoded = decode(dec, latents)
    errs = {"final_latent": rel_l2(latents, want["final_latent"])}
    if "decoded" in want:
        errs["decoded"] = rel_l2(decoded, want["decoded"])
    if "safety_pixel_values" in want and dec.feature_extractor is not None:
        errs["safety_pixel_values"] = rel_l2(safety_inputs(dec, pixels), want["safety_pixel_values"])
    png = np.asarray(Image.open(kit_dir / case["output_image"]).convert("RGB")).astype(np.int16)
    got = pixels[0].cpu().numpy().astype(np.int16)
    errs["pixels"] = float(np.abs(got - png).max()) if got.shape == png.shape else float("inf")
    return errs
