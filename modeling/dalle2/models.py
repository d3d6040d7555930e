"""Build models on the meta device and load weights strictly (after the explicit remaps)."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .convert import decoder_params, downsample_kinds, legacy_numerics, prior_params, remap_decoder, remap_prior
from .decoder import Decoder, DecoderParams
from .prior import DiffusionPriorNetwork

log = logging.getLogger(__name__)


def load_strict(model: nn.Module, sd: dict[str, Tensor], what: str, dtype: torch.dtype, device) -> nn.Module:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in bad[:5]]
        raise ValueError(f"{what}: weights do not match the config: missing {missing[:8]} ({len(missing)}), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)}), shape mismatches {shapes}")
    sd = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(dtype).eval().requires_grad_(False)


def build_prior(section: dict, sd: dict[str, Tensor], *, version=None, dtype=torch.float32, device="cpu",
                sample_timesteps: int | None = None) -> DiffusionPriorNetwork:
    """section: DiffusionPriorConfig dict; sd: the prior's state dict in the reference layout;
    version: the dalle2-pytorch version the checkpoint names (picks the attention numerics)."""
    p = prior_params(section)
    old = "net.null_text_embed" in sd and "net.null_text_encodings" not in sd
    p.legacy_attention = legacy_numerics(version, old)[0]
    sd, trained = remap_prior(sd, p)
    p.guidance_trained = trained
    if sample_timesteps is not None:
        p.sample_timesteps = sample_timesteps
    with torch.device("meta"):
        model = DiffusionPriorNetwork(p)
    return load_strict(model, sd, "prior", dtype, device)


def decoder_params_for(section: dict, sd: dict[str, Tensor], version=None) -> DecoderParams:
    """Params for a decoder checkpoint: Downsample variant and attention numerics read off it."""
    kinds = downsample_kinds(sd, len(section["unets"]))
    old = "conv" in kinds or any(".cross_attn.fn." in k for k in sd)
    return decoder_params(section, kinds, legacy_numerics(version, old))


def build_decoder(section: dict, sd: dict[str, Tensor], unet_numbers: list[int] | None = None, *, version=None,
                  dtype=torch.float32, device="cpu") -> Decoder:
    """Builds only `unet_numbers` (default all); their weights must all be present."""
    n = len(section["unets"])
    p = decoder_params_for(section, sd, version)
    numbers = unet_numbers or list(range(1, n + 1))
    sd = remap_decoder(sd, p, numbers)
    with torch.device("meta"):
        model = Decoder(p, numbers)
    return load_strict(model, sd, f"decoder unets {numbers}", dtype, device)


def decoder_from_unets(p: DecoderParams, unets: list[nn.Module | None]) -> Decoder:
    """Assemble a decoder from unets loaded out of different files."""
    d = Decoder.__new__(Decoder)
    nn.Module.__init__(d)
    d.params = p
    d.unets = nn.ModuleList(unets)
    return d
