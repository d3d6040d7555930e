"""Configs of the Emu diffusion decoders: the released sizes (for layout checks) and tiny ones.

    EMU2_UNET       BAAI/Emu2-Gen unet/: SDXL shape, cross-attention 1792, text_time 1792 + 6·256 = 3328
    EMU1_UNET       BAAI/Emu pretrain unet/ (inferred): SD-1.5 shape with a 5120-wide cross-attention
    SDXL_VAE, SD_VAE  the SDXL / SD VAEs (same shapes; scaling 0.13025 / 0.18215)
    EULER, PNDM     the released scheduler configs (Emu2-Gen verbatim; Emu1 = Stable Diffusion v1)
    SAFETY_CHECKER  CompVis' StableDiffusionSafetyChecker (CLIP ViT-L/14 vision tower at 224)
    CLIP_PREPROCESS its feature_extractor (CLIP image processor at 224)
    tiny_configs(variant, context_dim)  the folders write_tiny_decoder writes
"""

from __future__ import annotations

import copy

_UNET_COMMON = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_norm": None, "downsample_padding": 1, "dual_cross_attention": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "num_attention_heads": None,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None,
}

EMU2_UNET = {
    **_UNET_COMMON, "_diffusers_version": "0.21.2",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 1792,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 2, "norm_num_groups": 32, "projection_class_embeddings_input_dim": 1792 + 6 * 256,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}

EMU1_UNET = {
    **_UNET_COMMON, "_diffusers_version": "0.6.0",
    "addition_embed_type": None, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 5120,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "layers_per_block": 2, "norm_num_groups": 32, "projection_class_embeddings_input_dim": None,
    "sample_size": 64, "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_linear_projection": False,
}

SDXL_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.21.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_VAE = {**SDXL_VAE, "_diffusers_version": "0.6.0", "sample_size": 512, "scaling_factor": 0.18215}

EULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.2", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
PNDM = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}

_CLIP_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
              "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768}
_CLIP_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                "image_size": 224, "patch_size": 14, "num_channels": 3, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-05, "projection_dim": 768}
SAFETY_CHECKER = {"architectures": ["StableDiffusionSafetyChecker"], "model_type": "clip", "projection_dim": 768,
                  "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
                  "text_config": _CLIP_TEXT, "vision_config": _CLIP_VISION}

CLIP_PREPROCESS = {
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 224},
}

RELEASED = {
    "emu2": {"unet": EMU2_UNET, "vae": SDXL_VAE, "scheduler": EULER, "safety_checker": SAFETY_CHECKER,
             "feature_extractor": CLIP_PREPROCESS},
    "emu1": {"unet": EMU1_UNET, "vae": SD_VAE, "scheduler": PNDM, "safety_checker": SAFETY_CHECKER,
             "feature_extractor": CLIP_PREPROCESS},
}


def tiny_configs(variant: str, context_dim: int) -> dict[str, dict]:
    """unet / vae / scheduler / safety_checker / feature_extractor configs of a tiny decoder whose
    cross-attention (and, for Emu2, text_embeds) width is `context_dim`."""
    if variant not in RELEASED:
        raise ValueError(f"variant must be 'emu1' or 'emu2', got {variant!r}")
    if not isinstance(context_dim, int) or context_dim <= 0:
        raise ValueError(f"context_dim must be a positive int, got {context_dim!r}")
    cfg = copy.deepcopy(RELEASED[variant])
    unet = cfg["unet"]
    if variant == "emu2":
        unet.update(attention_head_dim=[1, 2, 4], block_out_channels=[16, 32, 32], transformer_layers_per_block=[1, 1, 2],
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=context_dim + 6 * 8)
    else:
        unet.update(attention_head_dim=2, block_out_channels=[16, 16, 32, 32])
    unet.update(cross_attention_dim=context_dim, layers_per_block=1, norm_num_groups=8, sample_size=8)
    cfg["vae"].update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64)
    sc = cfg["safety_checker"]
    sc["projection_dim"] = 8
    sc["text_config"] = {**_CLIP_TEXT, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                         "num_hidden_layers": 1, "max_position_embeddings": 16, "vocab_size": 64, "projection_dim": 8,
                         "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    sc["vision_config"] = {**_CLIP_VISION, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                           "num_hidden_layers": 1, "image_size": 32, "patch_size": 16, "projection_dim": 8}
    cfg["feature_extractor"].update(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    return cfg
