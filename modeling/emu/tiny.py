"""A tiny random-weight Emu1 / Emu2-Gen in the released folder layouts, for demos and tests.

    write_tiny(directory, variant="emu2", seed=0) -> Path

Emu2: model_index.json, multimodal_encoder/ (config.json in the EmuForCausalLM form, two
`model.bf16-*` shards with both index files, fused EVA qkv biases, inv_freq buffers, lm_head),
tokenizer/. Emu1: multimodal_encoder/pytorch_model.bin, Emu-14B.json, llama_config/,
cformer_t5_config.json. Tokenizer files are trained on the fly (tiny_tokenizer.py). The
diffusion folders (unet/, vae/, scheduler/, feature_extractor/, safety_checker/) come from
modeling.emu.decoder.write_tiny_decoder, with the unet's cross-attention width set to the
encoder's embedding width (Emu2: EVA width 32, Emu1: LLM width 64).
Weights are float32 (the file names keep the release's `bf16` variant, as the parity kits do).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling.emu.config import (
    CFormerParams,
    Emu1Params,
    Emu2Params,
    EVAParams,
    LlamaParams,
)
from modeling.emu.encoder import Emu1Encoder, Emu2Encoder
from modeling.emu.layout import release_state_dict, unused_tensors
from modeling.emu.llama import inv_freq
from modeling.emu.tiny_tokenizer import write_emu1_tokenizer, write_emu2_tokenizer

EMU2_MODEL_INDEX = {
    "_class_name": "EmuVisualGenerationPipeline", "_diffusers_version": "0.21.2",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "multimodal_encoder": ["transformers_modules.multimodal_encoder.modeling_emu", "EmuForCausalLM"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"], "tokenizer": ["transformers", "LlamaTokenizerFast"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_emu2(vocab_size: int) -> Emu2Params:
    return Emu2Params(
        eva=EVAParams(image_size=56, patch_size=7, width=32, layers=2, heads=4, mlp_dim=80, postnorm=True),
        llm=LlamaParams(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=160),
        n_query=64,
    )


def tiny_emu1(vocab_size: int) -> Emu1Params:
    return Emu1Params(
        eva=EVAParams(image_size=28, patch_size=7, width=32, layers=2, heads=4, mlp_dim=64, postnorm=False),
        llm=LlamaParams(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=128),
        cformer=CFormerParams(d_model=32, d_kv=8, n_heads=4, d_ff=64, n_layers=2, num_buckets=8, max_distance=16,
                              encoder_width=32, n_causal=32, output_dim=64, vocab_size=16),
        clip_embed_dim=16,
    )


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 0.5/sqrt(fan_in)), embeddings and learned tokens ~ N(0, 0.02..1), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                t.fill_(1.0)
            elif t.ndim == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
            elif "embed_tokens" in name:
                t.copy_(torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / fan_in**0.5))


def _unused(p, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, shape in unused_tensors(p).items():
        out[name] = inv_freq(p.llm.head_dim, p.llm.rope_theta) if name.endswith("inv_freq") else \
            torch.randn(shape, generator=g) * 0.02
    return out


def emu2_config(p: Emu2Params, dtype: str = "float32") -> dict:
    """multimodal_encoder/config.json of the release (EmuForCausalLM form) for params p."""
    v, llm = p.eva, p.llm
    return {
        "architectures": ["EmuForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_emu.EmuConfig", "AutoModelForCausalLM": "modeling_emu.EmuForCausalLM"},
        "bos_token_id": 1, "d_model": v.width, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": llm.dim,
        "initializer_range": 0.02, "intermediate_size": llm.ffn_dim, "max_position_embeddings": llm.max_positions,
        "model_version": "base", "num_attention_heads": llm.n_heads, "num_hidden_layers": llm.n_layers,
        "num_key_value_heads": llm.n_kv_heads, "pad_token_id": llm.vocab_size - 272, "pretraining_tp": 1,
        "rms_norm_eps": llm.rms_eps, "rope_scaling": None, "rope_theta": llm.rope_theta, "tie_word_embeddings": False,
        "torch_dtype": dtype, "transformers_version": "4.31.0", "use_cache": True,
        "vision_config": {
            "drop_path_rate": 0, "eva_model_name": "eva-clip-E-14-plus", "head_width": v.head_dim,
            "image_size": v.image_size, "intermediate_size": v.mlp_dim, "layer_norm_eps": v.eps, "layers": v.layers,
            "mlp_ratio": v.mlp_dim / v.width, "n_query": p.n_query, "patch_size": v.patch_size, "postnorm": True,
            "qkv_bias": True, "v_query": p.n_query, "width": v.width, "xattn": True,
        },
        "vocab_size": llm.vocab_size,
    }


def write_emu2_encoder(out: Path, seed: int) -> Emu2Params:
    p = tiny_emu2(write_emu2_tokenizer(out / "tokenizer"))
    torch.manual_seed(seed)
    model = Emu2Encoder(p)
    randomise(model, seed)
    sd = {**release_state_dict(model), **_unused(p, seed)}
    enc = out / "multimodal_encoder"
    enc.mkdir(parents=True, exist_ok=True)
    shards = {f"model.bf16-0000{i}-of-00002.safetensors": {} for i in (1, 2)}
    names = list(shards)
    for k, t in sd.items():  # shard 2: the LLM (as the release puts its layers after EVA)
        shards[names[1] if k.startswith("model.decoder.") else names[0]][k] = t.contiguous()
    for name, tensors in shards.items():
        save_file(tensors, str(enc / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": {k: n for n, ts in shards.items() for k in sorted(ts)}}
    for name in ("model.safetensors.index.json", "model.safetensors.index.bf16.json"):
        (enc / name).write_text(json.dumps(index, indent=2))
    (enc / "config.json").write_text(json.dumps(emu2_config(p), indent=2))
    (out / "model_index.json").write_text(json.dumps(EMU2_MODEL_INDEX, indent=2))
    return p


def write_emu1_encoder(out: Path, seed: int) -> Emu1Params:
    base = write_emu1_tokenizer(out / "llama_config")
    p = tiny_emu1(base + 4)
    torch.manual_seed(seed)
    model = Emu1Encoder(p)
    randomise(model, seed)
    sd = {**release_state_dict(model), **_unused(p, seed)}
    (out / "multimodal_encoder").mkdir(parents=True, exist_ok=True)
    torch.save({k: t.contiguous() for k, t in sd.items()}, out / "multimodal_encoder" / "pytorch_model.bin")
    v, llm, c = p.eva, p.llm, p.cformer
    emu = {"embed_dim": p.clip_embed_dim,
           "vision_cfg": {"image_size": v.image_size, "layers": v.layers, "width": v.width, "head_width": v.head_dim,
                          "mlp_ratio": v.mlp_dim / v.width, "patch_size": v.patch_size, "eva_model_name": "eva-clip-g-14-x",
                          "drop_path_rate": 0, "xattn": True, "freeze": False},
           "multimodal_cfg": {"name": "llama-13B", "xattn": True, "n_causal": c.n_causal, "freeze": False},
           "vladapter_cfg": {"name": "cformer", "n_causal": c.n_causal}}
    (out / "Emu-14B.json").write_text(json.dumps(emu, indent=4))
    llama = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
             "hidden_size": llm.dim, "initializer_range": 0.02, "intermediate_size": llm.ffn_dim,
             "max_position_embeddings": llm.max_positions, "model_type": "llama", "num_attention_heads": llm.n_heads,
             "num_hidden_layers": llm.n_layers, "pad_token_id": 0, "rms_norm_eps": llm.rms_eps,
             "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.29.0",
             "use_cache": True, "vocab_size": base}
    (out / "llama_config" / "config.json").write_text(json.dumps(llama, indent=2))
    (out / "llama_config" / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))
    t5 = {"d_model": c.d_model, "d_kv": c.d_kv, "d_ff": c.d_ff, "num_layers": c.n_layers,
          "num_decoder_layers": c.n_layers, "num_heads": c.n_heads, "relative_attention_num_buckets": c.num_buckets,
          "relative_attention_max_distance": c.max_distance, "vocab_size": c.vocab_size, "dropout_rate": 0.1,
          "layer_norm_epsilon": c.eps, "feed_forward_proj": "relu", "is_encoder_decoder": True,
          "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    (out / "cformer_t5_config.json").write_text(json.dumps(t5, indent=2))
    return p


def write_tiny(directory: str | Path, variant: str = "emu2", seed: int = 0) -> Path:
    if variant not in ("emu1", "emu2"):
        raise ValueError(f"variant must be 'emu1' or 'emu2', got {variant!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    p = write_emu2_encoder(out, seed) if variant == "emu2" else write_emu1_encoder(out, seed)
    from modeling.emu.decoder import write_tiny_decoder

    # the unet's cross-attention context is the regressed embedding: Emu2 EVA width, Emu1 LLM width
    write_tiny_decoder(out, variant, p.eva.width if variant == "emu2" else p.llm.dim, seed)
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny(sys.argv[1] if len(sys.argv) > 1 else "emu-tiny-random", sys.argv[2] if len(sys.argv) > 2 else "emu2"))
