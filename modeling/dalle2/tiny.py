"""A tiny random-weight DALLE2 stack for demos and tests: `write_tiny(out_dir)`.

Writes clip/ (transformers CLIPModel + a real CLIP BPE tokenizer trained on the fly),
prior.pth (bare state dict) + prior_config.json, decoder.pth ({version, config, model}; unet 1
at 16² and one upsampler to 32² with low-res noise conditioning) and dalle2_config.json, a
dalle2-laion model config with local File entries. Takes a couple of seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_NAME = "dalle2_config.json"
DIM = 32

PRIOR = {
    "net": {"dim": DIM, "depth": 2, "dim_head": 16, "heads": 2, "max_text_len": 77, "num_timesteps": 100,
            "normformer": True, "rotary_emb": True},
    "image_embed_dim": DIM, "image_size": 32, "timesteps": 100, "sample_timesteps": 10, "cond_drop_prob": 0.1,
    "predict_x_start": True, "beta_schedule": "cosine", "condition_on_text_encodings": True,
}
DECODER = {
    "unets": [
        {"dim": 16, "dim_mults": [1, 2], "image_embed_dim": DIM, "text_embed_dim": DIM, "cond_on_text_encodings": True,
         "cond_dim": 16, "self_attn": [False, True], "attn_dim_head": 8, "attn_heads": 2, "num_resnet_blocks": 1},
        {"dim": 8, "dim_mults": [1, 2], "image_embed_dim": DIM, "cond_dim": 16, "attn_dim_head": 8, "attn_heads": 2,
         "num_resnet_blocks": 1, "sparse_attn": True},
    ],
    "image_sizes": [16, 32], "channels": 3, "timesteps": 100, "sample_timesteps": [8, 6],
    "beta_schedule": ["cosine", "linear"], "learned_variance": [True, False], "use_noise_for_lowres_cond": True,
}
CORPUS = [
    "a photo of a cat sitting on a red chair", "an oil painting of a lighthouse at dusk",
    "a corgi wearing sunglasses on the beach!", "a bowl of soup that looks like a monster, knitted out of wool",
    "the quick brown fox jumps over the lazy dog", "a watercolor of mountains and a river in spring",
    "an astronaut riding a horse in photorealistic style", "a close up of a flower, 4k, high detail",
]


def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
            elif name.endswith((".g", "norm.weight", "norm_cond.weight", "norm_mid_cond.weight")) or name == "g":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def write_tokenizer(out: Path) -> None:
    """Train a small CLIP-style BPE (byte-level alphabet, `</w>` word ends) and save it for CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=alphabet, end_of_word_suffix="</w>",
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    base = sorted(alphabet)
    ordered = base + [c + "</w>" for c in base]
    ordered += [t for t in vocab if t not in set(ordered)]
    for m in merges:  # every merge result must be in the vocab
        a, b = m.split(" ")
        if a + b not in ordered:
            ordered.append(a + b)
    ordered += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ordered)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    t = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>",
                      model_max_length=77)
    t.save_pretrained(str(out))


def write_clip(out: Path, seed: int) -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    write_tokenizer(out)
    tok = CLIPTokenizer.from_pretrained(str(out))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(out))


def write_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny stack into `out_dir`; returns the path of its dalle2-laion config JSON."""
    from .convert import decoder_params, prior_params
    from .decoder import Decoder
    from .prior import DiffusionPriorNetwork

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    write_clip(out / "clip", seed)
    prior = DiffusionPriorNetwork(prior_params(PRIOR))
    _randomize(prior, gen)
    torch.save({f"net.{k}": v for k, v in prior.state_dict().items()}, out / "prior.pth")
    (out / "prior_config.json").write_text(json.dumps({"prior": PRIOR}, indent=1))
    decoder = Decoder(decoder_params(DECODER))
    _randomize(decoder, gen)
    torch.save({"version": "1.15.6", "config": {"decoder": DECODER}, "model": decoder.state_dict()},
               out / "decoder.pth")
    local = lambda p: {"load_type": "local", "path": p}
    config = {
        "clip": {"make": "openai", "model": "clip"},
        "prior": {"load_model_from": local("prior.pth"), "load_config_from": local("prior_config.json"),
                  "default_sample_timesteps": 10, "default_cond_scale": 1.5},
        "decoder": {"unet_sources": [{"unet_numbers": [1, 2], "default_sample_timesteps": [8, 6],
                                      "default_cond_scale": [1.7, 1.0], "load_model_from": local("decoder.pth")}]},
        "devices": "cpu",
        "strict_loading": True,
    }
    path = out / CONFIG_NAME
    path.write_text(json.dumps(config, indent=1))
    return path
