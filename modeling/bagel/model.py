"""BAGEL: a Qwen2 Mixture-of-Transformers LLM with a SigLIP ViT and FLUX-VAE latent bridges.

Module names follow the released `ema.safetensors` exactly. Every per-layer weight has a
`_moe_gen` twin used by VAE-latent tokens (clean or noisy); text, image-boundary and ViT
tokens use the understanding weights. The model holds no sampling logic (see sampling.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.bagel.layers import KVCache, Plan, RMSNorm, apply_rope, attention, rope_cos_sin
from modeling.bagel.quant import Fp8Linear
from modeling.bagel.vit import SiglipParams, SiglipVisionModel
from modeling.layer_split import LayerSplit


@dataclass
class BagelParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    vit: SiglipParams = field(default_factory=SiglipParams)
    latent_channels: int = 16
    latent_patch_size: int = 2
    vae_downsample: int = 8
    max_latent_size: int = 64  # latent_pos_embed is max_latent_size**2 rows
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.latent_channels

    @property
    def latent_downsample(self) -> int:  # pixels per latent token side
        return self.vae_downsample * self.latent_patch_size


PRESETS: dict[str, BagelParams] = {
    "bagel-7b-mot": BagelParams(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        vit=SiglipParams(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16),
    ),
}


class Qwen2MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MINORITY_PATCH = 1 / 32  # see routed()


def routed(x: Tensor, gen: tuple[Tensor, Tensor] | None, f_und, f_gen) -> Tensor:
    """Apply f_und to understanding tokens and f_gen to gen tokens (both per-token maps).
    gen: (und_idx, gen_idx) token positions, or None (all understanding). When one expert's
    tokens are a small minority (a denoising forward: two boundary tokens per image), the
    other expert runs over every token and the minority's results are patched in, instead of
    gathering and scattering the whole batch."""
    if gen is None:
        return f_und(x)
    und_idx, gen_idx = gen
    if und_idx.numel() == 0:
        return f_gen(x)
    n = x.shape[0]
    if und_idx.numel() <= MINORITY_PATCH * n or gen_idx.numel() <= MINORITY_PATCH * n:
        (f_all, f_few, few) = (f_gen, f_und, und_idx) if und_idx.numel() < gen_idx.numel() else (f_und, f_gen, gen_idx)
        out = f_all(x)
        out[few] = f_few(x[few])
        return out
    a, b = f_und(x[und_idx]), f_gen(x[gen_idx])
    out = a.new_empty((x.shape[0], *a.shape[1:]))
    out[und_idx], out[gen_idx] = a, b
    return out


class MoTAttention(nn.Module):
    def __init__(self, p: BagelParams):
        super().__init__()
        D, hd, H, Hkv = p.hidden_size, p.head_dim, p.num_heads, p.num_kv_heads
        self.n_heads, self.n_kv, self.head_dim, self.theta = H, Hkv, hd, p.rope_theta
        self.rope = apply_rope  # Bagel.compile_blocks swaps in a compiled one
        for sfx in ("", "_moe_gen"):
            setattr(self, f"q_proj{sfx}", nn.Linear(D, H * hd, bias=True))
            setattr(self, f"k_proj{sfx}", nn.Linear(D, Hkv * hd, bias=True))
            setattr(self, f"v_proj{sfx}", nn.Linear(D, Hkv * hd, bias=True))
            setattr(self, f"o_proj{sfx}", nn.Linear(H * hd, D, bias=False))
            setattr(self, f"q_norm{sfx}", RMSNorm(hd, p.rms_norm_eps))
            setattr(self, f"k_norm{sfx}", RMSNorm(hd, p.rms_norm_eps))

    def _proj(self, x: Tensor, name: str, heads: int, sfx: str) -> Tensor:
        # x: [n, D] -> [n, heads, hd], q/k RMSNormed per head
        y = getattr(self, f"{name}_proj{sfx}")(x).unflatten(-1, (heads, self.head_dim))
        return getattr(self, f"{name}_norm{sfx}")(y) if name != "v" else y

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], plan: Plan, gen, cache: KVCache | None, layer: int):
        # x: [N, D]; q: [N, H, hd], k/v: [N, Hkv, hd], each routed on its own (no concatenation)
        q, k, v = (
            routed(x, gen, lambda t: self._proj(t, name, heads, ""), lambda t: self._proj(t, name, heads, "_moe_gen"))
            for name, heads in (("q", self.n_heads), ("k", self.n_kv), ("v", self.n_kv))
        )
        q, k = self.rope(q, *rope), self.rope(k, *rope)
        out = attention(q, k, v.contiguous(), plan, cache, layer)  # [N, H * hd]
        return routed(out, gen, self.o_proj, self.o_proj_moe_gen)


class MoTDecoderLayer(nn.Module):
    def __init__(self, p: BagelParams):
        super().__init__()
        self.self_attn = MoTAttention(p)
        self.mlp = Qwen2MLP(p.hidden_size, p.intermediate_size)
        self.mlp_moe_gen = Qwen2MLP(p.hidden_size, p.intermediate_size)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, RMSNorm(p.hidden_size, p.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", RMSNorm(p.hidden_size, p.rms_norm_eps))

    def forward(self, x: Tensor, rope, plan: Plan, gen, cache: KVCache | None, layer: int) -> Tensor:
        h = routed(x, gen, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, rope, plan, gen, cache, layer)
        h = routed(
            x,
            gen,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
        )
        return x + h


class Qwen2MoTModel(nn.Module):
    def __init__(self, p: BagelParams):
        super().__init__()
        self.embed_tokens = nn.Embedding(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(p) for _ in range(p.num_layers)])
        self.norm = RMSNorm(p.hidden_size, p.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(p.hidden_size, p.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, p: BagelParams):
        super().__init__()
        self.model = Qwen2MoTModel(p)
        self.lm_head = nn.Linear(p.hidden_size, p.vocab_size, bias=False)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # t: [N] in [0, 1] -> [N, dim]; [cos, sin] order
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Connector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported connector_act {act!r}")
        self.fc1, self.fc2 = nn.Linear(in_dim, out_dim), nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def sincos_2d(side: int, dim: int) -> Tensor:
    """The fixed 2-D sin-cos table [side**2, dim]: first half of the channels encodes the
    column, second half the row; each half is [sin, cos] over 10000**(-k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(side, dtype=torch.float64)
    col = coords[None, :].expand(side, side).reshape(-1)
    row = coords[:, None].expand(side, side).reshape(-1)

    def half(pos: Tensor) -> Tensor:
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([half(col), half(row)], dim=1).float()


class PosTable(nn.Module):
    """A fixed 2-D sin-cos table `pos_embed: [side**2, dim]`, indexed row * side + col."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(side * side, dim), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.pos_embed[ids]


class Bagel(nn.Module):
    def __init__(self, p: BagelParams):
        super().__init__()
        self.params = p
        self.language_model = Qwen2MoTForCausalLM(p)
        self.vit_model = SiglipVisionModel(p.vit)
        self.connector = Connector(p.vit.hidden_size, p.hidden_size, p.connector_act)
        self.vae2llm = nn.Linear(p.patch_latent_dim, p.hidden_size)
        self.llm2vae = nn.Linear(p.hidden_size, p.patch_latent_dim)
        self.time_embedder = TimestepEmbedder(p.hidden_size)
        self.latent_pos_embed = PosTable(p.max_latent_size, p.hidden_size)
        self.vit_pos_embed = PosTable(p.vit_max_num_patch_per_side, p.hidden_size)
        self.split: LayerSplit | None = None  # split_layers(): the LLM layers across several devices

    def split_layers(self, devices: Sequence[torch.device | str]) -> LayerSplit:
        """Put the LLM's decoder layers on `devices` in contiguous runs (a pipeline split by layer);
        everything else (embeddings, ViT, final norms, heads) stays on the first, where forward
        takes its inputs and returns its output. Call after loading, before new_cache."""
        split = LayerSplit(devices, self.params.num_layers)
        lm = self.language_model.model
        layers, lm.layers = lm.layers, nn.ModuleList()  # set aside: the rest goes home, each layer straight to its device
        self.to(split.home)
        lm.layers = layers
        split.place(layers)
        self.split = split
        return split

    # -- embeddings of the three token kinds: [n, D] each
    def embed_text(self, ids: Tensor) -> Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_latents(self, x: Tensor, t: Tensor, pos_ids: Tensor) -> Tensor:
        # x: [n, p*p*C] packed latents, t: [n] timestep per token, pos_ids: [n]
        dt = self.vae2llm.weight.dtype
        return self.vae2llm(x.to(dt)) + self.time_embedder(t) + self.latent_pos_embed(pos_ids)

    def embed_vit(self, pixels: Tensor, pos_ids: Tensor, seq_lens: list[int]) -> Tensor:
        # pixels: [n, 3*14*14] patchified (row, col, channel order), pos_ids: [n]
        h = self.vit_model(pixels.to(self.connector.fc1.weight.dtype), pos_ids, seq_lens)
        return self.connector(h) + self.vit_pos_embed(pos_ids)

    def forward(self, h: Tensor, pos: Tensor, plan: Plan, gen: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """h: [N, D] input embeddings, pos: [N] RoPE ids, gen: [N] bool (None: all und).
        Returns the final-normed hidden states [N, D]."""
        idx = None
        if gen is not None and bool(gen.any()):
            idx = (torch.nonzero(~gen).flatten(), torch.nonzero(gen).flatten())
        lm = self.language_model.model
        rope = rope_cos_sin(pos, self.params.head_dim, self.params.rope_theta)
        if self.split is not None:
            # the cache is not moved: each layer's keys and values already live on its device
            h = self.split.forward(lm.layers, h, (rope, plan, idx), lambda layer, i, x, s: layer(x, s[0], s[1], s[2], cache, i))
        else:
            for i, layer in enumerate(lm.layers):
                h = layer(h, rope, plan, idx, cache, i)
        return routed(h, idx, lm.norm, lm.norm_moe_gen)

    def compile_blocks(self) -> None:
        """torch.compile the LLM layers' RMSNorms, RoPE and MLPs (fuses their float32 and
        elementwise work), and FP8 projections where quantize_llm made them; attention, routing
        and the bridges stay eager. Dynamic shapes, so
        batches of other sizes reuse the graphs."""
        rope = torch.compile(apply_rope, dynamic=True)
        for layer in self.language_model.model.layers:
            layer.self_attn.rope = rope
            for m in layer.modules():
                if isinstance(m, (RMSNorm, Qwen2MLP)):
                    m.compile(dynamic=True)
            for m in layer.self_attn.children():  # FP8 projections: fuse their per-token quantisation
                if isinstance(m, Fp8Linear):
                    m.compile(dynamic=True)
        for m in (self.language_model.model.norm, self.language_model.model.norm_moe_gen):
            m.compile(dynamic=True)

    def new_cache(self, capacities: list[int]) -> KVCache:
        p, w = self.params, self.vae2llm.weight
        layer_devices = self.split.layer_devices() if self.split is not None else None
        return KVCache(p.num_layers, capacities, p.num_kv_heads, p.head_dim, w.device, w.dtype, layer_devices)
