"""Released checkpoint names of the Emu multimodal encoders, and how they map onto our modules.

    Emu2-Gen  model.visual.*            -> visual.*   (attn.qkv.bias = [q, 0, v] -> attn.q_bias, attn.v_bias)
              model.decoder.lm.model.*  -> decoder.*
              project_up / project_down -> same
    Emu1      decoder.lm.model.*        -> decoder.*
              decoder.lm.stu_regress_head.weight -> stu_regress_head.weight
              visual.*, ln_visual.*, cformer.*   -> same

Accepted but unused (never materialised): the LLM `lm_head`, `rotary_emb.inv_freq` (optional:
transformers after 4.31 no longer saves it), and Emu1's `visual.norm`, `visual.head` and
`cformer.cformer.embed_tokens`.
"""

from __future__ import annotations

import functools

import torch

from modeling.emu.config import Emu1Params, Emu2Params

# the encoder-side files a model folder needs besides the weights (load.check_layout; the
# diffusion folders are decoder.check_decoder_layout's)
EMU2_FILES = ("model_index.json", "multimodal_encoder/config.json")
EMU1_FILES = ("multimodal_encoder/pytorch_model.bin", "Emu-14B.json", "llama_config/config.json",
              "cformer_t5_config.json")


def _release_name(name: str, emu2: bool) -> str:
    if name.startswith("decoder."):
        return ("model.decoder.lm.model." if emu2 else "decoder.lm.model.") + name[len("decoder."):]
    if name == "stu_regress_head.weight":
        return "decoder.lm.stu_regress_head.weight"
    if emu2 and name.startswith("visual."):
        if name.endswith((".attn.q_bias", ".attn.v_bias")):
            return "model." + name.rsplit(".", 1)[0] + ".qkv.bias"
        return "model." + name
    return name


@functools.lru_cache(maxsize=8)
def _module_shapes(p: Emu1Params | Emu2Params) -> dict[str, tuple[int, ...]]:
    from modeling.emu.encoder import Emu1Encoder, Emu2Encoder

    with torch.device("meta"):
        m = Emu2Encoder(p) if isinstance(p, Emu2Params) else Emu1Encoder(p)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def unused_tensors(p: Emu1Params | Emu2Params, inv_freq: bool = True) -> dict[str, tuple[int, ...]]:
    emu2 = isinstance(p, Emu2Params)
    lm = "model.decoder.lm." if emu2 else "decoder.lm."
    out = {lm + "lm_head.weight": (p.llm.vocab_size, p.llm.dim)}
    if inv_freq:
        for i in range(p.llm.n_layers):
            out[f"{lm}model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (p.llm.head_dim // 2,)
    if not emu2:
        w = p.eva.width
        out.update({
            "visual.norm.weight": (w,), "visual.norm.bias": (w,),
            "visual.head.weight": (p.clip_embed_dim, w), "visual.head.bias": (p.clip_embed_dim,),
            "cformer.cformer.embed_tokens.weight": (p.cformer.vocab_size, p.cformer.d_model),
        })
    return out


def map_names(p: Emu1Params | Emu2Params) -> tuple[dict[str, list[str | None]], dict[str, tuple[int, ...]]]:
    """(release name -> module names it fills, unused release names -> shape). A fused EVA bias
    maps to [q_bias, None, v_bias]."""
    emu2 = isinstance(p, Emu2Params)
    used: dict[str, list[str | None]] = {}
    for name in _module_shapes(p):
        rel = _release_name(name, emu2)
        if rel.endswith(".qkv.bias"):
            slot = used.setdefault(rel, [None, None, None])
            slot[0 if name.endswith("q_bias") else 2] = name
        else:
            used[rel] = [name]
    return used, unused_tensors(p)


def release_layout(p: Emu1Params | Emu2Params, inv_freq: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of the released multimodal-encoder checkpoint for params p."""
    emu2 = isinstance(p, Emu2Params)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in _module_shapes(p).items():
        rel = _release_name(name, emu2)
        out[rel] = (3 * shape[0],) if rel.endswith(".qkv.bias") else shape
    out.update(unused_tensors(p, inv_freq))
    return out


def release_state_dict(model) -> dict[str, torch.Tensor]:
    """Our module's tensors under the released names (Emu2's EVA biases fused as [q, 0, v]);
    the unused tensors are not included (see unused_tensors)."""
    emu2 = model.variant == "emu2"
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    for name, t in sd.items():
        rel = _release_name(name, emu2)
        if rel.endswith(".qkv.bias"):
            if name.endswith("q_bias"):
                v = sd[name[: -len("q_bias")] + "v_bias"]
                out[rel] = torch.cat([t, torch.zeros_like(t), v])
        else:
            out[rel] = t
    return out
