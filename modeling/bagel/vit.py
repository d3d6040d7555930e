"""SigLIP NaViT as BAGEL uses it: patch embedding stored as a Linear over (row, col, channel)
patch values, a learned position table indexed row * side + col, no RoPE, images of any
size packed back to back and attending only within themselves."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from modeling.bagel.layers import attention, make_plan


@dataclass
class SiglipParams:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26  # layers kept: the released config lists one more
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipAttention(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        D = p.hidden_size
        self.n_heads = p.num_heads
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: Tensor, plan) -> Tensor:
        # x: [N, D]
        q, k, v = (f(x).unflatten(-1, (self.n_heads, -1)) for f in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v, plan))


class SiglipMLP(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        if p.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported ViT hidden_act {p.hidden_act!r}")
        self.fc1 = nn.Linear(p.hidden_size, p.intermediate_size)
        self.fc2 = nn.Linear(p.intermediate_size, p.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.self_attn = SiglipAttention(p)
        self.layer_norm2 = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)
        self.mlp = SiglipMLP(p)

    def forward(self, x: Tensor, plan) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), plan)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        self.patch_embedding = nn.Linear(p.num_channels * p.patch_size**2, p.hidden_size)
        self.position_embedding = nn.Embedding(p.patches_per_side**2, p.hidden_size)

    def forward(self, pixels: Tensor, pos_ids: Tensor) -> Tensor:
        return self.patch_embedding(pixels) + self.position_embedding(pos_ids)


class SiglipEncoder(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(p) for _ in range(p.num_layers)])


class SiglipVisionTransformer(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        self.embeddings = SiglipEmbeddings(p)
        self.encoder = SiglipEncoder(p)
        self.post_layernorm = nn.LayerNorm(p.hidden_size, eps=p.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    def __init__(self, p: SiglipParams):
        super().__init__()
        self.params = p
        self.vision_model = SiglipVisionTransformer(p)

    def forward(self, pixels: Tensor, pos_ids: Tensor, seq_lens: list[int]) -> Tensor:
        # pixels: [N, C*P*P], pos_ids: [N], seq_lens: patches per image -> [N, D]
        vm = self.vision_model
        plan = make_plan(seq_lens, device=pixels.device)
        x = vm.embeddings(pixels, pos_ids)
        for layer in vm.encoder.layers:
            x = layer(x, plan)
        return vm.post_layernorm(x)
