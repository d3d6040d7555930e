"""The autoregressive regression of Emu's visual embeddings, KV-cached and batched.

The references re-run the whole sequence n times per image at batch 1. Here: one prefill of
every row's prompt + [IMG] (rows left-padded, positions cumsum(mask) - 1), then n - 1
single-token steps, each feeding back the previous step's embedding (Emu2 through project_up,
Emu1 as is) in place of the next <image>. Embedding k = head(final-norm hidden at the last
position). Prompt images' embeddings fill their <image> slots in order of appearance.

    prompt_inputs(enc, prompts, images) -> x [B, P, D], valid [B, P]
    regress(enc, x, valid, n) -> RegressOut(embeds [B, n, d], ...)
    encode_prompts(enc, prompts, pixels)      tokenised prompts + their pixels -> [B, n, d]
    unconditional(enc, tok)                   the "" branch (same for every row: compute once)
    autoencode(enc, pixels) / autoencode_uncond(enc)   Emu2's image-only mode (no LLM)

`decode_step` is a top-level function with fixed shapes per step (static cache, index_copy
writes, columns/positions passed as tensors), so it can be wrapped by torch.compile or captured
in a CUDA graph (`GraphedStep`); pass the wrapped one as `regress(..., step=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from modeling.emu.encoder import Emu1Encoder, Emu2Encoder
from modeling.emu.tokens import EmuTokenizer, Prompt


@dataclass
class RegressOut:
    embeds: Tensor  # [B, n, d] the regressed embeddings: the diffusion decoder's context
    hidden: Tensor | None = None  # [B, P + n - 1, D] final-norm hidden states (trace=True)
    inputs: Tensor | None = None  # [B, P + n - 1, D] LLM input embeddings (trace=True)
    valid: Tensor | None = None  # [B, P + n - 1] bool, False at left padding (trace=True)


def prompt_inputs(enc: Emu1Encoder | Emu2Encoder, prompts: list[Prompt], images: list[Tensor | None]):
    """Embed each row's ids, put its prompt images' LLM inputs at their <image> slots, left-pad.
    images[r]: [k_r, n, D] (k_r = prompts[r].n_images) or None. -> x [B, P, D], valid [B, P] bool"""
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries")
    emb = enc.decoder.embed_tokens
    dev, D = emb.weight.device, emb.weight.shape[1]
    P = max(len(p.ids) for p in prompts)
    x = torch.zeros(len(prompts), P, D, device=dev, dtype=emb.weight.dtype)
    valid = torch.zeros(len(prompts), P, dtype=torch.bool, device=dev)
    for r, (p, img) in enumerate(zip(prompts, images)):
        e = emb(torch.tensor(p.ids, device=dev))
        k = 0 if img is None else img.shape[0]
        if k != p.n_images or (img is not None and img.shape[0] * img.shape[1] != len(p.image_positions)):
            shape = None if img is None else tuple(img.shape)
            raise ValueError(f"row {r}: prompt has {p.n_images} images ({len(p.image_positions)} slots), got {shape}")
        if k:
            e[torch.tensor(p.image_positions, device=dev)] = img.reshape(-1, D).to(e.dtype)
        x[r, P - len(p.ids):] = e
        valid[r, P - len(p.ids):] = True
    return x, valid


def decode_step(enc, x: Tensor, cols: Tensor, pos: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward (prefill: S tokens, step: 1). x: [B, S, D]; cols: [S]; pos: [B, S];
    key_valid: [B, max_len] -> hidden [B, S, D], embedding [B, 1, d], next input [B, 1, D]."""
    h = enc.decoder(x, cols, pos, key_valid)
    e = enc.regress_head(h[:, -1:])
    return h, e, enc.feed_back(e)


class GraphedStep:
    """`decode_step` with the single-token forward replayed from a CUDA graph: one graph per
    (batch size, cache), captured on first use; the prefill, whose length varies with every
    batch, and any CPU call run eagerly. Inputs are copied into the graph's static tensors, and
    the outputs returned are the graph's own (valid until the next call of the same shape)."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, list[Tensor], tuple[Tensor, Tensor, Tensor]]] = {}
        self.cache_ptr = 0

    def __call__(self, enc, x: Tensor, cols: Tensor, pos: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.shape[1] != 1 or x.device.type != "cuda":
            return decode_step(enc, x, cols, pos, key_valid)
        cache_ptr = enc.decoder.layers[0].self_attn.kv_cache.k.data_ptr()
        if cache_ptr != self.cache_ptr:  # the cache was re-allocated (a longer prompt): the graphs point at the old one
            self.graphs.clear()
            self.cache_ptr = cache_ptr
        key = (x.shape[0], key_valid.shape[1])
        if key not in self.graphs:
            static = [t.clone() for t in (x, cols, pos, key_valid)]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture; writes the cache column this call writes anyway
                decode_step(enc, *static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = decode_step(enc, *static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, (x, cols, pos, key_valid)):
            dst.copy_(src)
        graph.replay()
        return out


@torch.no_grad()
def regress(enc, x: Tensor, valid: Tensor, n: int | None = None, *, trace: bool = False, step=decode_step) -> RegressOut:
    """x: [B, P, D] left-padded prompt inputs ending with each row's [IMG]; valid: [B, P]."""
    n = enc.n_embeds if n is None else n
    B, P, _ = x.shape
    if n < 1 or valid.shape != (B, P) or not bool(valid[:, -1].all()):
        raise ValueError(f"regress needs n >= 1 and left-padded rows ending in a real token, got n={n}, "
                         f"x {tuple(x.shape)}, valid {tuple(valid.shape)}")
    L = P + n - 1
    dec = enc.decoder
    dec.setup_caches(max(B, dec.max_batch), max(L, dec.max_len))  # no-op when the actor sized it up front
    key_valid = torch.ones(B, dec.max_len, dtype=torch.bool, device=x.device)
    key_valid[:, :P] = valid
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # a padded row sees the positions it would see alone
    cols = torch.arange(L, device=x.device)
    h, e, nxt = step(enc, x, cols[:P], pos, key_valid)
    embeds = torch.empty(B, n, e.shape[-1], device=x.device, dtype=e.dtype)
    embeds[:, :1] = e
    hidden, inputs = [h], [x]
    last = pos[:, -1:]  # [B, 1]
    for k in range(1, n):
        if trace:
            inputs.append(nxt)
        h, e, nxt = step(enc, nxt, cols[P - 1 + k: P + k], last + k, key_valid)
        embeds[:, k: k + 1] = e
        if trace:
            hidden.append(h)
    if not trace:
        return RegressOut(embeds)
    full_valid = torch.cat([valid, torch.ones(B, n - 1, dtype=torch.bool, device=x.device)], dim=1)
    return RegressOut(embeds, torch.cat(hidden, 1), torch.cat(inputs, 1), full_valid)


@torch.no_grad()
def image_inputs(enc, pixels: list[Tensor | None]) -> list[Tensor | None]:
    """Per row [k_r, 3, S, S] pixels (or None) -> per row [k_r, n, D] LLM inputs, one EVA batch for all."""
    real = [p for p in pixels if p is not None and p.shape[0]]
    if not real:
        return [None] * len(pixels)
    out = enc.image_inputs(torch.cat(real).to(enc.decoder.embed_tokens.weight.device))
    rows, i = [], 0
    for p in pixels:
        k = 0 if p is None else p.shape[0]
        rows.append(out[i: i + k] if k else None)
        i += k
    return rows


@torch.no_grad()
def encode_prompts(enc, prompts: list[Prompt], pixels: list[Tensor | None], *, trace: bool = False) -> RegressOut:
    """Tokenised prompts (tok.encode(parts), generate=True) + their images' pixels -> regressed embeddings."""
    x, valid = prompt_inputs(enc, prompts, image_inputs(enc, pixels))
    return regress(enc, x, valid, trace=trace)


@torch.no_grad()
def unconditional(enc, tok: EmuTokenizer) -> Tensor:
    """The guidance branch of both references: the text "" with no image -> [1, n, d].
    It is the same for every row and call: compute it once per loaded model."""
    return encode_prompts(enc, [tok.encode([""])], [None]).embeds


def is_autoencode(parts: list[object]) -> bool:
    """Emu2 skips the LLM when the prompt has images and no text part at all (not even "")."""
    return bool(parts) and not any(isinstance(p, str) for p in parts)


@torch.no_grad()
def autoencode(enc: Emu2Encoder, pixels: Tensor) -> Tensor:
    """Emu2 image-only prompts: the pooled EVA features are the context. [B, 3, S, S] -> [B, n, W]"""
    if not isinstance(enc, Emu2Encoder):
        raise ValueError("autoencoding (image-only prompts without the LLM) is Emu2's mode only")
    return enc.image_features(pixels.to(enc.project_up.weight.device))


@torch.no_grad()
def autoencode_uncond(enc: Emu2Encoder) -> Tensor:
    """Its guidance branch: EVA features of an all-zero *normalised* image (mean grey). -> [1, n, W]"""
    S = enc.params.eva.image_size
    w = enc.project_up.weight
    return autoencode(enc, torch.zeros(1, 3, S, S, device=w.device, dtype=w.dtype))
