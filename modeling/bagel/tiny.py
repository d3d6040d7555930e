"""A tiny random-weight BAGEL in the released checkpoint layout, for demos and tests.

    write_tiny(out_dir, seed=0) -> Path

writes ema.safetensors, ae.safetensors, llm_config.json, vit_config.json and real Qwen2
tokenizer files (a byte-level BPE trained on the fly on a small built-in corpus), with
<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|> at ids 0..4.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from modeling.bagel.autoencoder import AutoEncoder, AutoEncoderParams
from modeling.bagel.model import Bagel, BagelParams, sincos_2d
from modeling.bagel.vit import SiglipParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
CORPUS = """a red cube on a table. a photo of a cat sitting on a sofa. make it blue.
what is in the picture? describe the image in detail. a watercolor painting of a mountain lake
at sunrise. replace the sky with a starry night. add a hat to the dog. the quick brown fox
jumps over the lazy dog. an astronaut riding a horse on the moon, digital art, high quality.
turn the car green and remove the people in the background. how many apples are on the plate?
"""
TOKENIZER_VOCAB = 512


def tiny_params(vocab_size: int) -> BagelParams:
    return BagelParams(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vit=SiglipParams(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
    )


TINY_AE = AutoEncoderParams(ch=32, ch_mult=[1, 2, 4, 4], num_res_blocks=1)


def write_tokenizer(out_dir: Path) -> int:
    """Train and save the byte-level BPE; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n") * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json, merges.txt
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "errors": "replace", "model_max_length": 32768,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size()


def _llm_config(p: BagelParams) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads, "hidden_act": "silu", "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    }


def _vit_config(v: SiglipParams) -> dict:
    return {
        "model_type": "siglip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers + 1, "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
        "patch_size": v.patch_size, "image_size": v.image_size, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }


def random_bagel(p: BagelParams, seed: int = 0) -> Bagel:
    torch.manual_seed(seed)
    model = Bagel(p)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "_norm" in name:
                continue
            if t.ndim == 2 and "pos_embed" not in name:
                t.normal_(0.0, 0.5 / t.shape[1] ** 0.5 if "embed_tokens" not in name else 1.0)
        model.latent_pos_embed.pos_embed.copy_(sincos_2d(p.max_latent_size, p.hidden_size))
        model.vit_pos_embed.pos_embed.copy_(sincos_2d(p.vit_max_num_patch_per_side, p.hidden_size))
    return model


def write_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = tiny_params(write_tokenizer(out))
    model = random_bagel(p, seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "ema.safetensors"))
    torch.manual_seed(seed + 1)
    ae = AutoEncoder(TINY_AE)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(out / "ae.safetensors"))
    (out / "llm_config.json").write_text(json.dumps(_llm_config(p), indent=1))
    (out / "vit_config.json").write_text(json.dumps(_vit_config(p.vit), indent=1))
    return out


if __name__ == "__main__":
    import sys

    print(write_tiny(sys.argv[1] if len(sys.argv) > 1 else "bagel-tiny-random"))
