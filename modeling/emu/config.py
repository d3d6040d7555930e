"""Params of the Emu multimodal encoders, read from the released config files.

    Emu2-Gen  multimodal_encoder/config.json   (EmuForCausalLM form: LLaMA keys + vision_config)
    Emu1      Emu-14B.json (vision_cfg, n_causal) + llama_config/config.json + cformer_t5_config.json

One params dataclass per top-level module (EVAParams, LlamaParams, CFormerParams) and one per
encoder (Emu2Params, Emu1Params); PRESETS holds the released sizes. Options the references
support but the released models do not use (EVA rope/subln/swiglu, LLaMA rope scaling) are
refused with a ValueError rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Emu1's reference adds these to the LLaMA tokenizer (pad first, then the image tokens), so the
# embedding has vocab_size + 4 rows (32004 at release).
EMU1_ADDED_TOKENS = ("[PAD]", "[IMG]", "[/IMG]", "<image>")


@dataclass(frozen=True)
class EVAParams:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    postnorm: bool  # Emu2's EVA-CLIP-E: x + LN(f(x)); Emu1's EVA-CLIP-g: x + f(LN(x))
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class LlamaParams:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass(frozen=True)
class CFormerParams:
    """Emu1's CausalFormer: the decoder stack of a T5 (t5-base at release) over EVA features."""

    d_model: int
    d_kv: int
    n_heads: int
    d_ff: int
    n_layers: int
    num_buckets: int
    max_distance: int
    encoder_width: int  # the EVA width the cross-attention keys/values read
    n_causal: int  # learned query tokens = image embeddings per image
    output_dim: int  # the LLM width (projection)
    eps: float = 1e-6
    gated: bool = False  # feed_forward_proj "gated-gelu" (wi_0/wi_1) vs "relu" (wi)
    vocab_size: int = 32128  # only for the unused embed_tokens tensor of the checkpoint


@dataclass(frozen=True)
class Emu2Params:
    eva: EVAParams
    llm: LlamaParams
    n_query: int = 64  # pooled EVA tokens per image = regressed embeddings per image


@dataclass(frozen=True)
class Emu1Params:
    eva: EVAParams
    llm: LlamaParams
    cformer: CFormerParams
    clip_embed_dim: int = 1024  # only for the unused visual.head tensor of the checkpoint

    @property
    def n_causal(self) -> int:
        return self.cformer.n_causal


def _mlp_dim(width: int, mlp_ratio: float | None, explicit: int | None) -> int:
    derived = int(width * mlp_ratio) if mlp_ratio is not None else None  # the reference's rule
    if explicit is not None and derived is not None and explicit != derived:
        raise ValueError(f"vision intermediate_size {explicit} != int(width {width} * mlp_ratio {mlp_ratio}) = {derived}")
    dim = explicit if explicit is not None else derived
    if dim is None:
        raise ValueError("vision config has neither intermediate_size nor mlp_ratio")
    return dim


def _refuse(v: dict, where: str) -> None:
    for key in ("rope", "subln", "naiveswiglu", "global_average_pool", "intp_freq"):
        if v.get(key):
            raise ValueError(f"{where}: {key}={v[key]!r} is not supported (the released Emu EVA towers do not use it)")
    for key in ("init_value", "ls_init_value"):
        if v.get(key):
            raise ValueError(f"{where}: layer scale {key}={v[key]!r} is not supported")
    if not v.get("qkv_bias", True):
        raise ValueError(f"{where}: qkv_bias=False is not supported")


def eva_params(v: dict, *, postnorm_default: bool, where: str) -> EVAParams:
    _refuse(v, where)
    width, head_width = int(v["width"]), int(v["head_width"])
    if width % head_width:
        raise ValueError(f"{where}: width {width} is not a multiple of head_width {head_width}")
    size, patch = int(v["image_size"]), int(v["patch_size"])
    if size % patch:
        raise ValueError(f"{where}: image_size {size} is not a multiple of patch_size {patch}")
    return EVAParams(
        image_size=size, patch_size=patch, width=width, layers=int(v["layers"]), heads=width // head_width,
        mlp_dim=_mlp_dim(width, v.get("mlp_ratio"), v.get("intermediate_size")),
        postnorm=bool(v.get("postnorm", postnorm_default)), eps=float(v.get("layer_norm_eps", 1e-6)),
    )


def llama_params(c: dict, *, extra_vocab: int = 0, where: str) -> LlamaParams:
    if c.get("rope_scaling"):
        raise ValueError(f"{where}: rope_scaling={c['rope_scaling']!r} is not supported")
    if c.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias=true is not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={c['hidden_act']!r} is not supported (LLaMA uses silu)")
    heads = int(c["num_attention_heads"])
    return LlamaParams(
        vocab_size=int(c["vocab_size"]) + extra_vocab, dim=int(c["hidden_size"]), n_layers=int(c["num_hidden_layers"]),
        n_heads=heads, n_kv_heads=int(c.get("num_key_value_heads") or heads), ffn_dim=int(c["intermediate_size"]),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(c.get("rope_theta", 10000.0)),
        max_positions=int(c.get("max_position_embeddings", 2048)),
    )


def cformer_params(t5: dict, *, encoder_width: int, n_causal: int, output_dim: int) -> CFormerParams:
    proj = t5.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ValueError(f"cformer_t5_config.json: feed_forward_proj={proj!r} is not supported (relu | gated-gelu)")
    return CFormerParams(
        d_model=int(t5["d_model"]), d_kv=int(t5["d_kv"]), n_heads=int(t5["num_heads"]), d_ff=int(t5["d_ff"]),
        n_layers=int(t5.get("num_decoder_layers") or t5["num_layers"]),
        num_buckets=int(t5.get("relative_attention_num_buckets", 32)),
        max_distance=int(t5.get("relative_attention_max_distance", 128)),
        encoder_width=encoder_width, n_causal=n_causal, output_dim=output_dim,
        eps=float(t5.get("layer_norm_epsilon", 1e-6)), gated=proj == "gated-gelu",
        vocab_size=int(t5.get("vocab_size", 32128)),
    )


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def emu2_params_from_config(cfg: dict) -> Emu2Params:
    where = "multimodal_encoder/config.json"
    if "vision_config" not in cfg:
        raise ValueError(f"{where}: no vision_config (not the released EmuForCausalLM form)")
    v = cfg["vision_config"]
    return Emu2Params(
        eva=eva_params(v, postnorm_default=True, where=where),
        llm=llama_params(cfg, where=where),
        n_query=int(v.get("n_query", 64)),
    )


def emu1_params_from_configs(emu: dict, llama: dict, t5: dict) -> Emu1Params:
    eva = eva_params(emu["vision_cfg"], postnorm_default=False, where="Emu-14B.json")
    llm = llama_params(llama, extra_vocab=len(EMU1_ADDED_TOKENS), where="llama_config/config.json")
    n_causal = int(emu.get("vladapter_cfg", {}).get("n_causal", emu.get("multimodal_cfg", {}).get("n_causal", 32)))
    return Emu1Params(
        eva=eva, llm=llm,
        cformer=cformer_params(t5, encoder_width=eva.width, n_causal=n_causal, output_dim=llm.dim),
        clip_embed_dim=int(emu.get("embed_dim", 1024)),
    )


def emu2_params(model_dir: str | Path) -> Emu2Params:
    return emu2_params_from_config(read_json(Path(model_dir) / "multimodal_encoder" / "config.json"))


def emu1_params(model_dir: str | Path) -> Emu1Params:
    d = Path(model_dir)
    return emu1_params_from_configs(
        read_json(d / "Emu-14B.json"), read_json(d / "llama_config" / "config.json"), read_json(d / "cformer_t5_config.json")
    )


PRESETS: dict[str, Emu1Params | Emu2Params] = {
    # BAAI/Emu2-Gen: EVA-CLIP-E-14-plus (448², post-norm) + LLaMA-33B shape, 32272 tokens
    "emu2-gen": Emu2Params(
        eva=EVAParams(image_size=448, patch_size=14, width=1792, layers=64, heads=16, mlp_dim=15360, postnorm=True),
        llm=LlamaParams(vocab_size=32272, dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, ffn_dim=17920),
        n_query=64,
    ),
    # BAAI/Emu pretrain: EVA-CLIP-g (224², pre-norm) + t5-base decoder cformer + LLaMA-13B, 32004 tokens
    "emu1": Emu1Params(
        eva=EVAParams(image_size=224, patch_size=14, width=1408, layers=40, heads=16, mlp_dim=6144, postnorm=False),
        llm=LlamaParams(vocab_size=32004, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
        cformer=CFormerParams(d_model=768, d_kv=64, n_heads=12, d_ff=3072, n_layers=12, num_buckets=32,
                              max_distance=128, encoder_width=1408, n_causal=32, output_dim=5120),
        clip_embed_dim=1024,
    ),
}
