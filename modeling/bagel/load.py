"""Load a BAGEL checkpoint directory in the released layout.

    ema.safetensors | model.safetensors   the MoT model (LLM, ViT, bridges)
    ae.safetensors                        the FLUX autoencoder (no config: read off shapes)
    llm_config.json, vit_config.json      Qwen2 / SigLIP configs (the ViT lists one layer more)
    tokenizer files                       Qwen2 tokenizer (tokenizer.json or vocab.json+merges.txt)

Modules are built on the meta device and each tensor is read on its own (safetensors
`safe_open`) straight to the target device and dtype, then assigned. Loading is strict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modeling.bagel.autoencoder import AutoEncoder, AutoEncoderParams
from modeling.bagel.model import Bagel, BagelParams
from modeling.bagel.vit import SiglipParams

WEIGHT_FILES = ("ema.safetensors", "model.safetensors")
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int
    eos_token_id: int
    start_of_image: int
    end_of_image: int


def weight_file(ckpt_dir: str | Path) -> Path:
    d = Path(ckpt_dir)
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {d}")


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    return json.loads(path.read_text())


def bagel_params(ckpt_dir: str | Path) -> BagelParams:
    """Params from llm_config.json, vit_config.json and the weight file's shapes."""
    d = Path(ckpt_dir)
    llm, vit = _json(d / "llm_config.json"), _json(d / "vit_config.json")
    shapes = read_shapes(weight_file(d))
    try:
        patch_dim = shapes["llm2vae.weight"][0]
        side = math.isqrt(shapes["latent_pos_embed.pos_embed"][0])
        vit_side = math.isqrt(shapes["vit_pos_embed.pos_embed"][0])
    except KeyError as e:
        raise ValueError(f"{weight_file(d)} is not a BAGEL checkpoint: no {e}") from None
    ae_file = d / "ae.safetensors"
    z = read_shapes(ae_file)["decoder.conv_in.weight"][1] if ae_file.is_file() else 16
    return BagelParams(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_layers=llm["num_hidden_layers"],
        num_heads=llm["num_attention_heads"],
        num_kv_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
        rope_theta=float(llm.get("rope_theta", 1e6)),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        vit=SiglipParams(
            hidden_size=vit["hidden_size"],
            intermediate_size=vit["intermediate_size"],
            num_layers=vit["num_hidden_layers"] - 1,  # BAGEL keeps the penultimate layer
            num_heads=vit["num_attention_heads"],
            patch_size=vit.get("patch_size", 14),
            image_size=vit.get("image_size", 980),
            num_channels=vit.get("num_channels", 3),
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
            hidden_act=vit.get("hidden_act", "gelu_pytorch_tanh"),
        ),
        latent_channels=z,
        latent_patch_size=math.isqrt(patch_dim // z),
        max_latent_size=side,
        vit_max_num_patch_per_side=vit_side,
    )


def load_weights(module: nn.Module, files: list[Path], device, dtype: torch.dtype) -> None:
    """Strictly load `files` into a meta-built module, one tensor at a time."""
    expected = module.state_dict()
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            found.update({k: path for k in f.keys()})
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {[p.name for p in files]} does not match the model: "
            f"{len(missing)} missing {missing[:20]}, {len(unexpected)} unexpected {unexpected[:20]}"
        )
    sd = {}
    dev = torch.device(device)
    for path in files:
        with safe_open(str(path), framework="pt", device=str(dev) if dev.type != "cpu" else "cpu") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if tuple(t.shape) != tuple(expected[k].shape):
                    raise ValueError(f"{k}: checkpoint shape {tuple(t.shape)} != model {tuple(expected[k].shape)}")
                sd[k] = t.to(device=dev, dtype=dtype if t.is_floating_point() else t.dtype)
    module.load_state_dict(sd, strict=True, assign=True)


def load_bagel(ckpt_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Bagel:
    p = bagel_params(ckpt_dir)
    with torch.device("meta"):
        model = Bagel(p)
    load_weights(model, [weight_file(ckpt_dir)], device, dtype)
    return model.eval().requires_grad_(False)


def load_ae(ckpt_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> AutoEncoder:
    d = Path(ckpt_dir)
    path = d / "ae.safetensors" if d.is_dir() else d
    if not path.is_file():
        raise FileNotFoundError(f"no ae.safetensors in {d}")
    factors = {}
    extra = path.parent / "ae_params.json"  # optional: only the parity kits carry one
    if extra.is_file():
        cfg = json.loads(extra.read_text())
        factors = {k: float(cfg[k]) for k in ("scale_factor", "shift_factor") if k in cfg}
    p = AutoEncoderParams.from_shapes(read_shapes(path), **factors)
    with torch.device("meta"):
        ae = AutoEncoder(p)
    load_weights(ae, [path], device, dtype)
    return ae.eval().requires_grad_(False)


def encode_text(tok, text: str) -> list[int]:
    """Ids of user text: a prompt that spells a special token ("<|im_start|>") gets the ids of
    its characters, never the special id (no prompt can inject a turn or an image)."""
    return tok.encode(text, split_special_tokens=True)


def load_tokenizer(ckpt_dir: str | Path):
    """(tokenizer, SpecialTokens) from the checkpoint's Qwen2 tokenizer files."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(ckpt_dir))
    ids = {}
    for key, token in SPECIAL_TOKENS.items():
        i = tok.convert_tokens_to_ids(token)
        if i is None or i == tok.unk_token_id:
            raise ValueError(f"tokenizer in {ckpt_dir} has no {token}")
        ids[key] = int(i)
    return tok, SpecialTokens(**ids)
