"""Building blocks shared by the BAGEL LLM and ViT: norms, RoPE, packed attention, KV cache.

Sequences travel *packed*: `x: [N, D]` holds every token of every sequence of a forward
back to back. A `Plan` says how they split into sequences, which cache row each reads,
and who may attend to whom; attention pads to `[S, L, H, D]` for SDPA (or stays packed
for flash-attn varlen when it is importable and the plan's mask is expressible there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.bagel.attn import SplitGroup, split_attention, split_groups

try:  # optional fast path
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - not installed on CPU boxes
    flash_attn_varlen_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Qwen2's RMSNorm (normalise in float32, round to x's dtype, then scale by the weight)
        # without materialising a 16-bit x in float32: the variance reads x once, and the
        # float32 product is rounded to x's dtype as it is stored.
        if x.dtype == torch.float32:
            var = x.pow(2).mean(-1, keepdim=True)
        else:
            var = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[-1])
        h = torch.mul(x, torch.rsqrt(var.add_(self.eps)), out=torch.empty_like(x))
        return self.weight * h


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    # pos: [N] -> cos, sin: [N, 1, head_dim] (float32)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.int64).float() / head_dim))
    freqs = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [N, H, D]; rotate-half convention in float32: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]
    # (cos/sin repeat across the two halves), each half rounded to x's dtype as it is stored
    half = x.shape[-1] // 2
    x1, x2, c, s = x[..., :half], x[..., half:], cos[..., :half], sin[..., :half]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.sub(x1 * c, x2 * s, out=out[..., :half])
    torch.add(x2 * c, x1 * s, out=out[..., half:])
    return out


class KVCache:
    """Rows packed back to back, each with its own capacity (no padding to the longest):
    per layer `k, v: [sum(capacities), Hkv, D]`; row r owns slots starts[r] .. + capacity[r]
    and `lens[r]` of them are valid. `layer_devices`: each layer's own device (a stack split
    across devices, modeling/layer_split.py); by default every layer's is `device`."""

    def __init__(self, n_layers: int, capacities: list[int], n_kv: int, head_dim: int, device, dtype, layer_devices=None):
        caps = [max(1, c) for c in capacities]
        shape = (sum(caps), n_kv, head_dim)
        devices = list(layer_devices) if layer_devices is not None else [device] * n_layers
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.capacity = torch.tensor(caps, device=device)
        self.starts = torch.cumsum(self.capacity, 0) - self.capacity
        self.lens = [0] * len(caps)
        # (capacity, starts) on each layer device, copied once: indexing needs them where the layer's rows are
        self._index = {d: (self.capacity.to(d), self.starts.to(d)) for d in {k.device for k in self.k}}

    def read(self, layer: int, rows: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """k, v of the first `length` slots of each row: [S, length, Hkv, D] (slots past a
        row's capacity repeat its last one; callers mask what lies past a row's length)."""
        capacity, starts = self._index[self.k[layer].device]
        ar = torch.arange(length, device=rows.device)
        idx = starts[rows][:, None] + torch.minimum(ar[None, :], capacity[rows][:, None] - 1)
        return self.k[layer][idx], self.v[layer][idx]

    def write(self, layer: int, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
        # rows, slots: [N] per token; k, v: [N, Hkv, D]
        capacity, starts = self._index[self.k[layer].device]
        if layer == 0 and bool((slots >= capacity[rows]).any()):
            raise ValueError("KV cache row overflow: a forward writes past its row's capacity")
        idx = starts[rows] + slots
        self.k[layer][idx] = k
        self.v[layer][idx] = v


@dataclass
class Plan:
    """How one packed forward splits into sequences and what each may attend to."""

    seq_lens: list[int]  # query tokens per sequence
    ctx_lens: list[int]  # cached tokens each sequence attends to first
    rows: Tensor | None  # [S] cache row per sequence (None: no cache)
    kind: str  # "full" (bidirectional), "causal" or "mixed" (causal + image blocks)
    pad_index: Tensor  # [N] flat index into [S * Lq]
    mask: Tensor | None  # [S, 1, Lq|1, Lc + Lq] bool, None when nothing is masked
    write_rows: Tensor | None  # [N] cache row per token when the forward writes the cache
    write_slots: Tensor | None  # [N] cache slot per token
    key_index: Tensor | None = None  # [sum(ctx+q)] flat index into [S * (Lc + Lq)] (flash)
    groups: list[SplitGroup] | None = None  # split attention (see attn.py), by sequence length

    @property
    def n_seq(self) -> int:
        return len(self.seq_lens)

    @property
    def lq(self) -> int:
        return max(self.seq_lens)

    @property
    def lc(self) -> int:
        return max(self.ctx_lens)


def make_plan(
    seq_lens: list[int],
    *,
    ctx_lens: list[int] | None = None,
    rows: list[int] | None = None,
    blocks: Tensor | None = None,
    causal: bool = False,
    write: bool = False,
    split: bool = False,
    device=None,
) -> Plan:
    """blocks: [N] image-block id per token (-1 = text): a token sees earlier tokens
    (causal) and every token of its own block; None means all-full or all-causal.
    split: full attention over a read-only cache, computed as context part + own part
    merged by log-sum-exp (attn.py), so the own part needs no mask."""
    S = len(seq_lens)
    ctx_lens = list(ctx_lens) if ctx_lens is not None else [0] * S
    lq, lc = max(seq_lens), max(ctx_lens)
    kind = "mixed" if blocks is not None else ("causal" if causal else "full")
    seq_t = torch.tensor(seq_lens, device=device)
    ctx_t = torch.tensor(ctx_lens, device=device)
    seq_id = torch.repeat_interleave(torch.arange(S, device=device), seq_t)
    starts = torch.cumsum(seq_t, 0) - seq_t
    offset = torch.arange(seq_id.numel(), device=device) - starts[seq_id]
    pad_index = seq_id * lq + offset

    ar_q = torch.arange(lq, device=device)
    q_valid = ar_q[None, :] < seq_t[:, None]  # [S, Lq]
    c_valid = torch.arange(lc, device=device)[None, :] < ctx_t[:, None]  # [S, Lc]
    if kind == "full":
        mask = torch.cat([c_valid, q_valid], dim=1)[:, None, None, :]
        if bool(mask.all()):
            mask = None
    else:
        allowed = ar_q[None, :, None] >= ar_q[None, None, :]  # j <= i
        allowed = allowed.expand(S, lq, lq)
        if kind == "mixed":
            bp = torch.full((S * lq,), -2, device=device, dtype=torch.long)
            bp[pad_index] = blocks.to(device)
            bp = bp.view(S, lq)
            same = (bp[:, :, None] == bp[:, None, :]) & (bp[:, :, None] >= 0)
            allowed = allowed | same
        new = allowed & q_valid[:, None, :]
        old = c_valid[:, None, :].expand(S, lq, lc)
        mask = torch.cat([old, new], dim=2)
        mask = mask | ~q_valid[:, :, None]  # padded queries see everything (discarded)
        mask = mask[:, None]

    write_rows = write_slots = None
    rows_t = torch.tensor(rows, device=device) if rows is not None else None
    if write:
        if rows_t is None or len(set(rows)) != len(rows):
            raise ValueError(f"a cache-writing forward needs distinct rows, got {rows}")
        write_rows = rows_t[seq_id]
        write_slots = ctx_t[seq_id] + offset
    key_index = None
    if flash_attn_varlen_func is not None and kind != "mixed":
        lk = lc + lq
        parts = [
            torch.cat([torch.arange(c, device=device), lc + torch.arange(q, device=device)]) + s * lk
            for s, (c, q) in enumerate(zip(ctx_lens, seq_lens))
        ]
        key_index = torch.cat(parts)
    groups = None
    if split:
        if kind != "full" or write or rows is None:
            raise ValueError("split attention needs full attention over a read-only cache")
        groups = split_groups(seq_lens, ctx_lens, rows, device)
    return Plan(seq_lens, ctx_lens, rows_t, kind, pad_index, mask, write_rows, write_slots, key_index, groups)


def _to_padded(x: Tensor, plan: Plan) -> Tensor:
    # x: [N, H, D] -> [S, Lq, H, D]
    out = x.new_zeros((plan.n_seq * plan.lq, *x.shape[1:]))
    out[plan.pad_index] = x
    return out.view(plan.n_seq, plan.lq, *x.shape[1:])


def attention(q: Tensor, k: Tensor, v: Tensor, plan: Plan, cache: KVCache | None = None, layer: int = 0) -> Tensor:
    """q: [N, H, D], k/v: [N, Hkv, D] packed (RoPE applied) -> [N, H * D]."""
    N, H, D = q.shape
    fast_varlen = plan.key_index is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if plan.groups is not None and cache is not None and not fast_varlen:
        return split_attention(q, k, v, plan.groups, cache, layer)
    kp, vp = _to_padded(k, plan), _to_padded(v, plan)
    if cache is not None and plan.lc > 0:
        kc, vc = cache.read(layer, plan.rows, plan.lc)
        kk, vv = torch.cat([kc, kp], dim=1), torch.cat([vc, vp], dim=1)
    else:
        kk, vv = kp, vp
    if plan.write_rows is not None:
        cache.write(layer, plan.write_rows, plan.write_slots, k, v)
    if fast_varlen:
        lens_k = [c + s for c, s in zip(plan.ctx_lens, plan.seq_lens)]
        cu_q = F.pad(torch.cumsum(torch.tensor(plan.seq_lens, device=q.device), 0), (1, 0)).int()
        cu_k = F.pad(torch.cumsum(torch.tensor(lens_k, device=q.device), 0), (1, 0)).int()
        kf = kk.reshape(-1, *kk.shape[2:])[plan.key_index]
        vf = vv.reshape(-1, *vv.shape[2:])[plan.key_index]
        out = flash_attn_varlen_func(
            q.contiguous(), kf, vf, cu_q, cu_k, plan.lq, max(lens_k), causal=plan.kind == "causal"
        )
        return out.reshape(N, H * D)
    qp = _to_padded(q, plan)
    gqa = H != kk.shape[2]
    if gqa and plan.mask is not None:  # masked kernels (mem-efficient) lack GQA: expand the kv heads
        kk, vv = kk.repeat_interleave(H // kk.shape[2], dim=2), vv.repeat_interleave(H // vv.shape[2], dim=2)
        gqa = False
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=plan.mask, enable_gqa=gqa
    )  # [S, H, Lq, D]
    out = out.transpose(1, 2).reshape(plan.n_seq * plan.lq, H * D)
    return out[plan.pad_index]
