"""Split attention for the denoising forward: image queries over (a) the row's cached
context and (b) the image's own tokens, merged exactly by log-sum-exp.

Softmax over the union of two key sets is the LSE-weighted mix of the two partial
softmaxes: out = out_b + sigmoid(lse_a - lse_b) * (out_a - out_b). Part (b) has the same
length for every sequence of one image size, so it runs unmasked (flash kernel on CUDA);
only the short part (a) pads the rows' contexts and needs a key mask.

`sdpa_lse` returns (out, lse) from the CUDA cuDNN / flash / memory-efficient kernels
through their aten ops, or from a chunked float32 math fallback (CPU, or when a kernel
fails its one-time self-check against the math on this device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)
MATH_CHUNK_BYTES = 1 << 30  # score memory per chunk of queries in the math fallback
_VERIFIED: dict[tuple, bool] = {}


def math_lse(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """q: [B, H, Lq, D], k/v: [B, Hkv, Lk, D], key_mask: [B, Lk] bool (True = attend).
    Returns out [B, H, Lq, D] (q's dtype) and lse [B, H, Lq] float32."""
    B, H, Lq, D = q.shape
    g = H // k.shape[1]
    kf = k.float().repeat_interleave(g, 1) if g > 1 else k.float()
    vf = v.float().repeat_interleave(g, 1) if g > 1 else v.float()
    chunk = max(1, MATH_CHUNK_BYTES // max(1, 4 * B * H * k.shape[2]))
    outs, lses = [], []
    for i in range(0, Lq, chunk):
        s = (q[:, :, i : i + chunk].float() @ kf.transpose(-1, -2)) * D**-0.5
        if key_mask is not None:
            s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)  # fully masked rows: no weight
        outs.append((p @ vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _flash(q, k, v, key_mask):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    return out, lse


def _flash_expanded(q, k, v, key_mask):
    g = q.shape[1] // k.shape[1]
    return _flash(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), key_mask)


def _efficient(q, k, v, key_mask):
    g = q.shape[1] // k.shape[1]
    if g > 1:  # the memory-efficient kernel has no GQA
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    bias = None
    if key_mask is not None:
        pad = -k.shape[2] % 16  # the kernel wants an aligned bias row
        if pad:
            k = torch.nn.functional.pad(k, (0, 0, 0, pad))
            v = torch.nn.functional.pad(v, (0, 0, 0, pad))
            key_mask = torch.nn.functional.pad(key_mask, (0, pad), value=False)
        bias = torch.zeros(key_mask.shape, device=q.device, dtype=q.dtype).masked_fill(~key_mask, float("-inf"))
        bias = bias[:, None, None, :].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False)[:2]
    return out, lse[..., : q.shape[2]]


def _cudnn(q, k, v, key_mask):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, lse.reshape(q.shape[:3])  # cuDNN's stats are [B, H, L, 1]


def _cudnn_expanded(q, k, v, key_mask):
    g = q.shape[1] // k.shape[1]
    return _cudnn(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), key_mask)


KERNELS = {"cudnn": _cudnn, "cudnn_expanded": _cudnn_expanded, "flash": _flash, "flash_expanded": _flash_expanded,
           "efficient": _efficient}
# unmasked 16-bit attention, best first (cuDNN's fused attention is the fastest on Hopper);
# a benchmark may reorder it
UNMASKED_ORDER = ["cudnn", "cudnn_expanded", "flash", "flash_expanded", "efficient"]


def _works(name: str, q: Tensor, k: Tensor, masked: bool) -> bool:
    """Run kernel `name` once on random inputs of (q, k)'s lengths and heads (batch 2) and
    compare with the math; a kernel that raises or differs is not used for this kind of call."""
    key = (name, q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[3], masked)
    if key not in _VERIFIED:
        g = torch.Generator(device=q.device).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, device=q.device, generator=g).to(q.dtype)  # noqa: E731
        (_, H, Lq, D), Hkv, Lk = q.shape, k.shape[1], k.shape[2]
        tq, tk, tv = rnd(2, H, Lq, D), rnd(2, Hkv, Lk, D), rnd(2, Hkv, Lk, D)
        mask = None
        if masked:
            mask = torch.arange(Lk, device=q.device)[None, :] < torch.tensor([[Lk], [Lk // 3 + 1]], device=q.device)
        try:
            out, lse = KERNELS[name](tq, tk, tv, mask)
            ref, ref_lse = math_lse(tq, tk, tv, mask)
            tol = 1e-4 if q.dtype == torch.float32 else 3e-2
            ok = bool(((out.float() - ref.float()).abs().max() <= tol) & ((lse.float() - ref_lse).abs().max() <= tol))
            why = "" if ok else "results differ from the math"
        except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            log.warning("attention kernel %s unusable for %s: %s", name, key[1:], why)
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def sdpa_lse(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention with its log-sum-exp: q [B, H, Lq, D], k/v [B, Hkv, Lk, D], key_mask [B, Lk]."""
    masked = key_mask is not None
    for name in candidates(q, masked):
        if _works(name, q, k, masked):
            try:
                return KERNELS[name](q, k, v, key_mask)
            except RuntimeError as e:  # e.g. a shape this kernel does not take: stop using it
                log.warning("attention kernel %s failed (%s); falling back", name, e)
                _VERIFIED[(name, q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[3], masked)] = False
    return math_lse(q, k, v, key_mask)


def candidates(q: Tensor, masked: bool) -> list[str]:
    """Kernels to try, best first (the math fallback follows)."""
    if not q.is_cuda:
        return []
    if masked or q.dtype not in (torch.float16, torch.bfloat16):
        return ["efficient"]
    return list(UNMASKED_ORDER)


def kernels_checked() -> dict[str, bool]:
    """Which kernels passed their self-check so far (for logs and benchmarks)."""
    return {f"{k[0]}({str(k[2]).removeprefix('torch.')}, masked={k[6]})": ok for k, ok in _VERIFIED.items()}


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax over the union of two key sets from the two partial results ([B, H, L, D], [B, H, L])."""
    w = torch.sigmoid(lse_a - lse_b)[..., None]  # the share of the softmax mass in part a
    # out_b + w (out_a - out_b), computed in float32 and rounded once as it is stored
    return torch.addcmul(out_b, w, out_a - out_b, out=torch.empty(out_b.shape, dtype=out_b.dtype, device=out_b.device))


LONG_CONTEXT = 256  # contexts at least this long run one unmasked call per distinct length


@dataclass
class ContextPart:
    """Sequences of a group that attend to cached contexts in one call."""

    sub: Tensor  # [G'] positions in the group
    rows: Tensor  # [G'] their cache rows
    lc: int  # longest of their contexts
    mask: Tensor | None  # [G', lc] bool, None when all have length lc


@dataclass
class SplitGroup:
    """Sequences of one length L: their tokens, and the parts of them that have a context."""

    L: int
    tok_index: Tensor | None  # [G * L] packed index of the group's tokens (None: all tokens, in order)
    parts: list[ContextPart]


def _parts(seqs: list[int], ctx_lens: list[int], rows: list[int], device) -> list[ContextPart]:
    """Short contexts (prompts): one masked call. Long ones (edit: VAE + ViT tokens): one
    unmasked call per distinct length, so they too run on the flash kernel."""
    live = [j for j, s in enumerate(seqs) if ctx_lens[s] > 0]
    if not live:
        return []
    long = max(ctx_lens[seqs[j]] for j in live) >= LONG_CONTEXT
    by_len: dict[int, list[int]] = {}
    for j in live:
        by_len.setdefault(ctx_lens[seqs[j]] if long else 0, []).append(j)
    parts = []
    for js in by_len.values():
        lens = [ctx_lens[seqs[j]] for j in js]
        mask = None
        if len(set(lens)) > 1:
            mask = torch.arange(max(lens), device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        t = lambda x: torch.tensor(x, device=device)  # noqa: E731
        parts.append(ContextPart(t(js), t([rows[seqs[j]] for j in js]), max(lens), mask))
    return parts


def split_groups(seq_lens: list[int], ctx_lens: list[int], rows: list[int], device) -> list[SplitGroup]:
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    by_len: dict[int, list[int]] = {}
    for s, n in enumerate(seq_lens):
        by_len.setdefault(n, []).append(s)
    groups = []
    for L, seqs in by_len.items():
        tok = None
        if len(by_len) > 1:
            tok = torch.cat([torch.arange(starts[s], starts[s] + L, device=device) for s in seqs])
        groups.append(SplitGroup(L, tok, _parts(seqs, ctx_lens, rows, device)))
    return groups


def split_attention(q: Tensor, k: Tensor, v: Tensor, groups: list[SplitGroup], cache, layer: int) -> Tensor:
    """q: [N, H, D], k/v: [N, Hkv, D] packed image sequences (each attends to its cached
    context, then bidirectionally to itself) -> [N, H * D]."""
    N, H, D = q.shape
    out = None if len(groups) == 1 and groups[0].tok_index is None else q.new_empty(N, H * D)
    for g in groups:
        pick = (lambda x: x.view(-1, g.L, *x.shape[1:])) if g.tok_index is None else (
            lambda x: x[g.tok_index].view(-1, g.L, *x.shape[1:]))
        qg, kg, vg = (pick(x).transpose(1, 2) for x in (q, k, v))  # [G, H(kv), L, D]
        ob, lse_b = sdpa_lse(qg, kg, vg)
        for p in g.parts:  # disjoint sets of sequences
            kc, vc = (t.transpose(1, 2) for t in cache.read(layer, p.rows, p.lc))
            if p.sub.numel() == qg.shape[0]:  # every sequence of the group
                oa, lse_a = sdpa_lse(qg, kc, vc, p.mask)
                ob = merge(oa, lse_a, ob, lse_b)
            else:
                oa, lse_a = sdpa_lse(qg[p.sub], kc, vc, p.mask)
                ob.index_copy_(0, p.sub, merge(oa, lse_a, ob[p.sub], lse_b[p.sub]))
        og = ob.transpose(1, 2).reshape(-1, H * D)
        if out is None:
            return og
        out[g.tok_index] = og
    return out
