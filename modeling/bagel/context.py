"""Prompt contexts of BAGEL: embedding and KV-cache prefill.

A context is a list of segments: ("text", ids), ("vae", latent [C, h, w]) or
("vit", patches [n, 3*p*p], (rows, cols)). Text is `[bos] + ids + [eos]` with consecutive
RoPE ids and causal attention; an image is `[start] + tokens + [end]` sharing one RoPE id,
attending bidirectionally within itself and to everything before it. Clean VAE latents
use the gen expert and get `time_embedder(0)`; everything else uses the und expert.
All contexts of a batch are prefilled together (in chunks) in one KV cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from modeling.bagel.layers import make_plan
from modeling.bagel.load import SpecialTokens
from modeling.bagel.model import Bagel
from modeling.bagel.transforms import grid_ids, patchify

PREFILL_CHUNK_TOKENS = 32768  # contexts are prefilled in forwards of about this many tokens


def _ctx_key(ctx: list) -> tuple:
    return tuple(("text", tuple(s[1])) if s[0] == "text" else (s[0], id(s[1])) for s in ctx)


class Contexts:
    """Embeds and prefills contexts into one KV cache. Context i lives in cache row `row[i]`
    (identical contexts share a row when `share`: the cache is then read-only), has
    `lens[i]` tokens and continues at RoPE position `rope[i]`."""

    def __init__(self, model: Bagel, contexts: list[list], special: SpecialTokens, extra: int = 0, share: bool = False):
        dev = model.vae2llm.weight.device
        self.model, self.special = model, special
        keys = [_ctx_key(c) if share else i for i, c in enumerate(contexts)]
        rows: dict = {}
        self.row = [rows.setdefault(k, len(rows)) for k in keys]
        first = {r: contexts[i] for i, r in reversed(list(enumerate(self.row)))}
        uniq = [first[r] for r in range(len(rows))]
        vit_embeds = _embed_vits(model, [s for c in uniq for s in c if s[0] == "vit"])
        parts, rope_of, len_of = [], [], []
        block = 0
        for ctx in uniq:
            emb, pos, gen, blk, rope = [], [], [], [], 0
            for seg in ctx:
                if seg[0] == "text":
                    ids = [special.bos_token_id, *seg[1], special.eos_token_id]
                    emb.append(model.embed_text(torch.tensor(ids, device=dev)))
                    pos += range(rope, rope + len(ids))
                    gen += [False] * len(ids)
                    blk += [-1] * len(ids)
                    rope += len(ids)
                    continue
                body = vit_embeds[id(seg[1])] if seg[0] == "vit" else _embed_clean_latent(model, seg[1])
                emb.append(self._wrap(body))
                n = body.shape[0] + 2
                pos += [rope] * n
                gen += [False] + [seg[0] == "vae"] * (n - 2) + [False]
                blk += [block] * n
                block, rope = block + 1, rope + 1
            rope_of.append(rope)
            len_of.append(len(pos))
            parts.append((emb, pos, gen, blk))
        self.rope = [rope_of[r] for r in self.row]
        self.lens = [len_of[r] for r in self.row]
        self.cache = model.new_cache([n + extra for n in len_of])
        chunks, cur, size = [], [], 0
        for r in (r for r, n in enumerate(len_of) if n > 0):
            if cur and size + len_of[r] > PREFILL_CHUNK_TOKENS:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(r)
            size += len_of[r]
        for live in chunks + ([cur] if cur else []):
            h = torch.cat([e for r in live for e in parts[r][0]])
            cat = lambda j, dt: torch.tensor([v for r in live for v in parts[r][j]], device=dev, dtype=dt)  # noqa: E731
            pos, gen, blk = cat(1, torch.long), cat(2, torch.bool), cat(3, torch.long)
            plan = make_plan([len_of[r] for r in live], rows=live, blocks=blk, write=True, device=dev)
            model(h, pos, plan, gen, self.cache)
        self.cache.lens = list(len_of)

    def _wrap(self, body: Tensor) -> Tensor:
        s = self.special
        ends = self.model.embed_text(torch.tensor([s.start_of_image, s.end_of_image], device=body.device))
        return torch.cat([ends[:1], body.to(ends.dtype), ends[1:]])


def _embed_vits(model: Bagel, segs: list) -> dict[int, Tensor]:
    uniq = {id(s[1]): s for s in segs}
    if not uniq:
        return {}
    dev, side = model.vae2llm.weight.device, model.params.vit_max_num_patch_per_side
    pix = torch.cat([s[1] for s in uniq.values()]).to(dev)
    ids = torch.cat([grid_ids(*s[2], side) for s in uniq.values()]).to(dev)
    lens = [s[1].shape[0] for s in uniq.values()]
    out = model.embed_vit(pix, ids, lens).split(lens)
    return dict(zip(uniq, out))


def _embed_clean_latent(model: Bagel, latent: Tensor) -> Tensor:
    # latent: [C, H/8, W/8] -> tokens [h * w, D] with time_embedder(0) added
    p = model.params.latent_patch_size
    c, hh, ww = latent.shape
    h, w = hh // p, ww // p
    dev = model.vae2llm.weight.device
    x = patchify(latent[:, : h * p, : w * p].float(), p).to(dev)
    ids = grid_ids(h, w, model.params.max_latent_size).to(dev)
    return model.embed_latents(x, torch.zeros(h * w, device=dev), ids)
