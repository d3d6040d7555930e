"""DALLE2-pytorch train-config sections and state dicts -> this package's params and key layout.

Handles both the LAION release layout (dalle2-pytorch ~1.1: Conv2d k4 downsampling,
`cross_attn.fn.*`, prior `null_text_embed`) and the 1.10+/1.15 layout.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .decoder import DecoderParams
from .prior import PriorParams
from .schedule import check_against_buffers, make_schedule
from .unet import UnetParams

_PRIOR_NET_KEYS = {"dim", "depth", "dim_head", "heads", "ff_mult", "max_text_len", "num_timesteps", "norm_in",
                   "norm_out", "final_proj", "normformer", "rotary_emb"}
_PRIOR_NET_IGNORED = {"attn_dropout", "ff_dropout", "num_time_embeds", "num_image_embeds", "num_text_embeds",
                      "self_cond"}
_PRIOR_KEYS = {"timesteps", "sample_timesteps", "beta_schedule", "predict_x_start", "predict_v",
               "condition_on_text_encodings", "image_embed_scale", "sampling_clamp_l2norm",
               "sampling_final_clamp_l2norm", "init_image_embed_l2norm"}
_PRIOR_IGNORED = {"clip", "net", "image_embed_dim", "image_size", "image_channels", "cond_drop_prob",
                  "text_cond_drop_prob", "image_cond_drop_prob", "loss_type", "training_clamp_l2norm"}


def legacy_numerics(version, old_layout: bool) -> tuple[bool, bool]:
    """(attention < 1.4.3, linear attention < 1.4.0) for a checkpoint saved by dalle2-pytorch `version`.
    Without a version, the pre-1.9/1.10 key layout of the LAION releases means ~1.1.0."""
    from packaging.version import Version

    if version is None:
        if not old_layout:
            return False, False
        version = Version("1.1.0")
    return version < Version("1.4.3"), version < Version("1.4.0")


def _unknown(d: dict, known: set, where: str) -> None:
    extra = sorted(set(d) - known)
    if extra:
        raise ValueError(f"{where}: unknown keys {extra}")


def prior_params(section: dict, guidance_trained: bool = True) -> PriorParams:
    """`section` is a DiffusionPriorConfig dict (the `prior` part of a TrainDiffusionPriorConfig)."""
    _unknown(section, _PRIOR_KEYS | _PRIOR_IGNORED, "prior config")
    net = dict(section["net"])
    _unknown(net, _PRIOR_NET_KEYS | _PRIOR_NET_IGNORED, "prior net config")
    for k in ("num_time_embeds", "num_image_embeds", "num_text_embeds"):
        if net.get(k, 1) != 1:
            raise ValueError(f"prior net {k}={net[k]} is not supported (only 1)")
    if net.get("self_cond"):
        raise ValueError("prior net self_cond=True is not supported")
    if net.get("num_timesteps") is None:
        raise ValueError("prior net without num_timesteps (continuous time MLP) is not supported")
    if section.get("image_embed_dim", net["dim"]) != net["dim"]:
        raise ValueError(f"prior image_embed_dim={section['image_embed_dim']} != net dim={net['dim']}")
    if net.get("max_text_len") is None:
        net.pop("max_text_len", None)
    drop = section.get("cond_drop_prob", 0.0)
    drop = min(section.get("text_cond_drop_prob", drop) or 0.0, section.get("image_cond_drop_prob", drop) or 0.0)
    kw = {k: v for k, v in net.items() if k in _PRIOR_NET_KEYS}
    kw.update({k: v for k, v in section.items() if k in _PRIOR_KEYS and v is not None})
    return PriorParams(**kw, cond_drop_prob=drop, guidance_trained=guidance_trained)


_UNET_KEYS = {f for f in UnetParams.__dataclass_fields__} - {"downsample", "extra", "lowres_cond", "channels_out",
                                                              "lowres_noise_cond", "cond_on_image_embeds"}
_UNET_IGNORED = {"attend_at_middle", "checkpoint_during_training", "out_dim", "cond_on_image_embeds",
                 "lowres_cond", "lowres_noise_cond", "channels_out"}
_UNET_FALSE = {"self_cond", "combine_upsample_fmaps", "cross_embed_downsample"}
_DECODER_KEYS = {"timesteps", "beta_schedule", "learned_variance", "predict_x_start", "predict_v",
                 "sample_timesteps", "use_noise_for_lowres_cond", "lowres_noise_sample_level",
                 "image_cond_drop_prob", "text_cond_drop_prob", "clip_denoised", "use_dynamic_thres",
                 "dynamic_thres_percentile", "ddim_sampling_eta", "channels"}
_DECODER_IGNORED = {"unets", "image_size", "image_sizes", "clip", "loss_type", "use_blur_for_lowres_cond",
                    "lowres_downsample_first", "blur_prob", "blur_sigma", "blur_kernel_size", "clip_x_start",
                    "vb_loss_weight", "p2_loss_weight_gamma", "p2_loss_weight_k", "random_crop_sizes",
                    "auto_normalize_img", "unconditional", "learned_variance_constrain_frac", "vae",
                    "predict_x_start_for_latent_diffusion", "clip_adapter_overrides"}


def decoder_params(section: dict, downsample: list[str] | None = None,
                   legacy: tuple[bool, bool] = (False, False)) -> DecoderParams:
    """`section` is a DecoderConfig dict (the `decoder` part of a TrainDecoderConfig)."""
    _unknown(section, _DECODER_KEYS | _DECODER_IGNORED, "decoder config")
    for k in ("unconditional", "learned_variance_constrain_frac", "predict_x_start_for_latent_diffusion"):
        if section.get(k):
            raise ValueError(f"decoder {k}=True is not supported")
    if section.get("vae"):
        raise ValueError("latent-diffusion decoders (vae) are not supported")
    if section.get("auto_normalize_img", True) is not True:
        raise ValueError("decoder auto_normalize_img=False is not supported")
    unets_cfg = section["unets"]
    sizes = section.get("image_sizes") or [section["image_size"]]
    kw = {k: v for k, v in section.items() if k in _DECODER_KEYS and v is not None}
    for k in ("beta_schedule", "predict_x_start", "predict_v", "sample_timesteps"):
        if k in kw and not isinstance(kw[k], (list, tuple)):
            kw[k] = [kw[k]] * len(unets_cfg)
    probe = DecoderParams(unets=[UnetParams(dim=8, lowres_cond=i > 0) for i in range(len(unets_cfg))],
                          image_sizes=list(sizes), **kw)
    channels = section.get("channels", 3)
    unets = []
    for i, u in enumerate(unets_cfg):
        where = f"decoder unet {i + 1} config"
        _unknown(u, _UNET_KEYS | _UNET_IGNORED | _UNET_FALSE, where)
        for k in _UNET_FALSE:
            if u.get(k):
                raise ValueError(f"{where}: {k}=True is not supported")
        ukw = {k: v for k, v in u.items() if k in _UNET_KEYS and v is not None}
        ukw.update(channels=channels, lowres_cond=i > 0, lowres_noise_cond=probe.use_noise_for_lowres_cond[i],
                   cond_on_image_embeds=i == 0, cond_on_text_encodings=bool(u.get("cond_on_text_encodings")),
                   channels_out=channels * (2 if probe.learned_variance[i] else 1),
                   downsample=(downsample or ["unshuffle"] * len(unets_cfg))[i],
                   legacy_attention=legacy[0], legacy_linear_attention=legacy[1])
        unets.append(UnetParams(**ukw))
    return DecoderParams(unets=unets, image_sizes=list(sizes), **kw)


def downsample_kinds(sd: dict[str, Tensor], num_unets: int) -> list[str]:
    """Which Downsample each unet uses, read off the weights: Conv2d k4 (old) or pixel-unshuffle + 1x1."""
    kinds = []
    for i in range(num_unets):
        kind = "unshuffle"
        for k, v in sd.items():
            if re.fullmatch(rf"unets\.{i}\.downs\.\d+\.[04]\.weight", k) and v.ndim == 4 and v.shape[-1] == 4:
                kind = "conv"
                break
        kinds.append(kind)
    return kinds


def remap_prior(sd: dict[str, Tensor], p: PriorParams) -> tuple[dict[str, Tensor], bool]:
    """-> (state dict in this package's layout, guidance_trained). Drops clip.* and checks scheduler buffers."""
    out, sched = {}, {}
    for k, v in sd.items():
        if k.startswith("clip."):
            continue
        if k.startswith("noise_scheduler."):
            sched[k.split(".", 1)[1]] = v
            continue
        if not k.startswith("net."):
            raise ValueError(f"prior checkpoint: unexpected key {k!r}")
        out[k[4:]] = v
    check_against_buffers(make_schedule(p.beta_schedule, p.timesteps), sched, "prior")
    trained = True
    if "null_text_embed" in out and "null_text_encodings" not in out:  # dalle2-pytorch < 1.9
        out["null_text_encodings"] = out.pop("null_text_embed")
        out["null_text_embeds"] = torch.zeros(1, 1, p.dim)
        out["null_image_embed"] = torch.zeros(1, p.dim)
        trained = False
    return out, trained


def remap_decoder(sd: dict[str, Tensor], p: DecoderParams, unet_numbers: list[int]) -> dict[str, Tensor]:
    """Keeps the wanted unets' weights, renames `cross_attn.fn.` and checks scheduler buffers."""
    out, sched = {}, {}
    wanted = {n - 1 for n in unet_numbers}
    for k, v in sd.items():
        m = re.match(r"noise_schedulers\.(\d+)\.(.+)", k)
        if m:
            sched.setdefault(int(m.group(1)), {})[m.group(2)] = v
            continue
        if k.startswith(("clip.", "lowres_conds.", "vaes.")):
            continue
        m = re.match(r"unets\.(\d+)\.", k)
        if not m:
            raise ValueError(f"decoder checkpoint: unexpected key {k!r}")
        if int(m.group(1)) in wanted:
            out[k.replace(".cross_attn.fn.", ".cross_attn.")] = v
    for i, buffers in sched.items():
        if i in wanted and i < len(p.beta_schedule):
            check_against_buffers(make_schedule(p.beta_schedule[i], p.timesteps), buffers, f"decoder unet {i + 1}")
    return out
