"""The two Emu multimodal encoders: EVA tower + LLaMA + the heads that map between them.

    Emu2Encoder  image -> EVA -> pool to n_query -> project_up -> LLM inputs;
                 LLM hidden -> project_down (6656 -> 1792) = regressed embedding;
                 fed back through project_up
    Emu1Encoder  image -> EVA forward_features -> ln_visual -> cformer -> LLM inputs;
                 LLM hidden -> stu_regress_head (5120 -> 5120) = regressed embedding; fed back as is

Both expose the same surface for regress.py: `decoder` (LlamaDecoder), `image_inputs(pixels)`,
`regress_head(h)`, `feed_back(e)`, `n_embeds`, `embed_dim`. No sampling code here.
"""

from __future__ import annotations

from torch import Tensor, nn

from modeling.emu.cformer import CausalFormer
from modeling.emu.config import Emu1Params, Emu2Params
from modeling.emu.eva import EVAVisionTower, pool_features
from modeling.emu.llama import LlamaDecoder


class Emu2Encoder(nn.Module):
    variant = "emu2"

    def __init__(self, p: Emu2Params):
        super().__init__()
        self.params = p
        self.visual = EVAVisionTower(p.eva)
        self.decoder = LlamaDecoder(p.llm)
        self.project_up = nn.Linear(p.eva.width, p.llm.dim, bias=False)
        self.project_down = nn.Linear(p.llm.dim, p.eva.width, bias=False)

    def setup_caches(self, max_batch: int, max_len: int) -> None:
        self.decoder.setup_caches(max_batch, max_len)

    @property
    def n_embeds(self) -> int:
        return self.params.n_query

    @property
    def embed_dim(self) -> int:
        return self.params.eva.width

    def image_features(self, pixels: Tensor) -> Tensor:
        # [B, 3, S, S] -> pooled EVA features [B, n_query, W] (autoencoding uses these as the prompt)
        return pool_features(self.visual(pixels), self.params.n_query)

    def image_inputs(self, pixels: Tensor) -> Tensor:
        # [B, 3, S, S] -> LLM inputs at the image's <image> slots: [B, n_query, D]
        return self.project_up(self.image_features(pixels))

    def regress_head(self, h: Tensor) -> Tensor:
        return self.project_down(h)

    def feed_back(self, e: Tensor) -> Tensor:
        return self.project_up(e)


class Emu1Encoder(nn.Module):
    variant = "emu1"

    def __init__(self, p: Emu1Params):
        super().__init__()
        self.params = p
        self.visual = EVAVisionTower(p.eva)
        self.ln_visual = nn.LayerNorm(p.eva.width, eps=1e-6)
        self.cformer = CausalFormer(p.cformer)
        self.decoder = LlamaDecoder(p.llm)
        self.stu_regress_head = nn.Linear(p.llm.dim, p.llm.dim, bias=False)

    def setup_caches(self, max_batch: int, max_len: int) -> None:
        self.decoder.setup_caches(max_batch, max_len)

    @property
    def n_embeds(self) -> int:
        return self.params.n_causal

    @property
    def embed_dim(self) -> int:
        return self.params.llm.dim

    def image_features(self, pixels: Tensor) -> Tensor:
        # [B, 3, S, S] -> ln_visual(EVA forward_features): [B, 1 + g*g, W] (CLS kept)
        return self.ln_visual(self.visual(pixels))

    def image_inputs(self, pixels: Tensor) -> Tensor:
        # [B, 3, S, S] -> cformer output, the LLM inputs at the image's <image> slots: [B, n_causal, D]
        return self.cformer(self.image_features(pixels))

    def regress_head(self, h: Tensor) -> Tensor:
        return self.stu_regress_head(h)

    def feed_back(self, e: Tensor) -> Tensor:
        return e


EmuEncoder = Emu1Encoder | Emu2Encoder
