"""The upsampler (unet 2, 64² -> 256²) both DALLE2 benches build: a DALLE2-pytorch DecoderConfig section.

dalle2-laion's upsampler is Veldrovive/upsamplers `working/latest.pth`, whose config
(`working/decoder_config.json`) sits on Hugging Face and could not be read where this was
written (no network, no copy in any checkout at hand). UPSAMPLER below is a stand-in of a
plausible size, not the released shapes: pass the released file's `decoder.unets[1]` as
`--upsampler-config JSON` (a unet section, or a whole decoder config) when it is at hand.
Settings the benches use on both sides: DDIM, cond_scale 1 (dalle2-laion sets no default
cond_scale for unet 2), low-res noise augmentation at 0.2, linear beta schedule.
"""

from __future__ import annotations

import json

UPSAMPLER = {
    "dim": 128, "cond_dim": 512, "image_embed_dim": 768, "cond_on_text_encodings": False, "channels": 3,
    "dim_mults": [1, 2, 4, 8], "num_resnet_blocks": 2, "attn_heads": 8, "attn_dim_head": 64,
    "memory_efficient": True, "init_cross_embed": False, "self_attn": [False, False, False, True],
}
# unet 1 is skipped when sampling starts at unet 2; a small one keeps the reference's Decoder valid
STAND_IN_UNET1 = {"dim": 32, "cond_dim": 64, "image_embed_dim": 768, "cond_on_text_encodings": False, "channels": 3,
                  "dim_mults": [1, 2], "num_resnet_blocks": 1, "attn_heads": 2, "attn_dim_head": 16}
TINY_UPSAMPLER = {"dim": 16, "cond_dim": 32, "image_embed_dim": 64, "cond_on_text_encodings": False, "channels": 3,
                  "dim_mults": [1, 2], "num_resnet_blocks": 1, "attn_heads": 2, "attn_dim_head": 16,
                  "memory_efficient": True, "init_cross_embed": False, "self_attn": [False, True]}
TINY_UNET1 = dict(STAND_IN_UNET1, image_embed_dim=64, cond_dim=32)


def decoder_section(unet1: dict, upsampler: dict, sizes: tuple[int, int]) -> dict:
    """A two-unet DecoderConfig section: `unet1` at sizes[0], `upsampler` at sizes[1]."""
    return {"unets": [unet1, upsampler], "image_sizes": list(sizes), "channels": 3, "timesteps": 1000,
            "beta_schedule": ["cosine", "linear"], "learned_variance": [True, False], "use_noise_for_lowres_cond": True}


def load_upsampler(path: str | None, tiny: bool) -> dict:
    """The upsampler's unet section: the stand-in, or unets[1] / the unet section of a JSON file."""
    if path is None:
        return dict(TINY_UPSAMPLER if tiny else UPSAMPLER)
    with open(path) as f:
        cfg = json.load(f)
    cfg = cfg.get("decoder", cfg)
    return dict(cfg["unets"][1] if "unets" in cfg else cfg)
