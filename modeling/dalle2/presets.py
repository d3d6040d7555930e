"""Published LAION configs (dalle2-laion / huggingface laion/DALLE2-PyTorch), as config sections.

The decoder v1.0.2 section is reconstructed from the release's tensor shapes (the published
JSON sets the same values); both are used by the layout test and the benchmark.
"""

LAION_PRIOR = {
    "net": {
        "dim": 768, "depth": 12, "num_timesteps": 1000, "max_text_len": 77, "num_time_embeds": 1,
        "num_image_embeds": 1, "num_text_embeds": 1, "dim_head": 64, "heads": 12, "ff_mult": 4,
        "norm_out": True, "attn_dropout": 0.05, "ff_dropout": 0.2, "final_proj": True, "normformer": True,
        "rotary_emb": True,
    },
    "image_embed_dim": 768, "image_size": 224, "image_channels": 3, "timesteps": 1000, "sample_timesteps": 64,
    "cond_drop_prob": 0.1, "loss_type": "l2", "predict_x_start": True, "beta_schedule": "cosine",
    "condition_on_text_encodings": True,
}

LAION_DECODER_V102 = {
    "unets": [{
        "dim": 320, "cond_dim": 512, "image_embed_dim": 768, "text_embed_dim": 768, "cond_on_text_encodings": True,
        "channels": 3, "dim_mults": [1, 2, 3, 4], "num_resnet_blocks": 4, "attn_heads": 8, "attn_dim_head": 64,
        "sparse_attn": True, "memory_efficient": True, "self_attn": [False, True, True, True],
    }],
    "image_sizes": [64], "channels": 3, "timesteps": 1000, "loss_type": "l2", "beta_schedule": ["cosine"],
    "learned_variance": True,
}
