"""Split attention (context part + own part merged by log-sum-exp) equals the masked one."""

import pytest
import torch
import torch.nn.functional as F

from modeling.bagel import attn
from modeling.bagel.layers import KVCache, attention, make_plan


def _case(seq_lens, ctx_lens, rows, H=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_rows = max(rows) + 1
    caps = [max([c for c, r in zip(ctx_lens, rows) if r == row], default=0) + row for row in range(n_rows)]
    cache = KVCache(1, caps, Hkv, D, "cpu", torch.float32)  # rows of their own capacities
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    N = sum(seq_lens)
    q = torch.randn(N, H, D, generator=g)
    k, v = torch.randn(N, Hkv, D, generator=g), torch.randn(N, Hkv, D, generator=g)
    return q, k, v, cache


@pytest.mark.parametrize(
    "seq_lens, ctx_lens, rows",
    [
        ([10, 10, 10, 10], [7, 0, 3, 7], [0, 1, 2, 0]),  # one size; an empty context (t2i CFG-text)
        ([10, 26, 10, 26, 5], [4, 4, 9, 0, 12], [0, 0, 1, 2, 3]),  # mixed sizes, shared rows
        ([8, 8], [5, 5], [0, 1]),  # equal contexts: no mask at all
        ([6, 6], [0, 0], [0, 0]),  # no context anywhere
    ],
)
def test_split_equals_masked(seq_lens, ctx_lens, rows):
    q, k, v, cache = _case(seq_lens, ctx_lens, rows)
    masked = make_plan(seq_lens, ctx_lens=ctx_lens, rows=rows)
    split = make_plan(seq_lens, ctx_lens=ctx_lens, rows=rows, split=True)
    assert split.groups is not None and masked.groups is None
    want = attention(q, k, v, masked, cache, 0)
    got = attention(q, k, v, split, cache, 0)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and both equal attention over each sequence's explicit key list
    start = 0
    for n, c, r in zip(seq_lens, ctx_lens, rows):
        s0 = int(cache.starts[r])
        kk = torch.cat([cache.k[0][s0:s0 + c], k[start:start + n]]).repeat_interleave(2, 1)
        vv = torch.cat([cache.v[0][s0:s0 + c], v[start:start + n]]).repeat_interleave(2, 1)
        ref = F.scaled_dot_product_attention(q[start:start + n].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1))
        torch.testing.assert_close(got[start:start + n], ref.transpose(0, 1).reshape(n, -1), atol=1e-5, rtol=1e-5)
        start += n


def test_math_lse_matches_sdpa_and_logsumexp(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 4, 9, 8, generator=g), torch.randn(3, 2, 13, 8, generator=g), torch.randn(3, 2, 13, 8, generator=g)
    mask = torch.arange(13)[None] < torch.tensor([[13], [5], [1]])
    monkeypatch.setattr(attn, "MATH_CHUNK_BYTES", 4 * 3 * 4 * 13 * 2)  # two queries per chunk
    out, lse = attn.math_lse(q, k, v, mask)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    s = (q @ kk.transpose(-1, -2)) / 8**0.5
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~mask[:, None, None], float("-inf")), -1))


def test_split_plan_refuses_cache_writes():
    with pytest.raises(ValueError, match="split attention"):
        make_plan([3, 3], ctx_lens=[1, 2], rows=[0, 1], split=True, write=True)


def test_packed_cache_rows_and_overflow():
    cache = KVCache(2, [3, 0, 5], 1, 2, "cpu", torch.float32)
    assert cache.k[0].shape == (3 + 1 + 5, 1, 2) and cache.starts.tolist() == [0, 3, 4]
    kv = torch.arange(16, dtype=torch.float32).view(8, 1, 2)
    rows, slots = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2]), torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    for layer in (0, 1):
        cache.write(layer, rows, slots, kv, -kv)
    k, v = cache.read(1, torch.tensor([2, 0]), 4)
    assert torch.equal(k[0], kv[3:7]) and torch.equal(k[1, :3], kv[:3]) and torch.equal(v[0], -kv[3:7])
    with pytest.raises(ValueError, match="overflow"):
        cache.write(0, torch.tensor([0]), torch.tensor([3]), kv[:1], kv[:1])


def test_kernels_failing_their_self_check_fall_back_to_math(monkeypatch, caplog):
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)

    def wrong(q, k, v, mask):
        out, lse = attn.math_lse(q, k, v, mask)
        return out, lse + 1.0

    def broken(q, k, v, mask):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(attn, "KERNELS", {"wrong": wrong, "broken": broken, "good": attn.math_lse})
    monkeypatch.setattr(attn, "_VERIFIED", {})
    monkeypatch.setattr(attn, "candidates", lambda q, masked: ["wrong", "broken", "good"])
    calls = []
    monkeypatch.setitem(attn.KERNELS, "good", lambda *a: calls.append(1) or attn.math_lse(*a))
    out, lse = attn.sdpa_lse(q, k, v)
    torch.testing.assert_close(lse, attn.math_lse(q, k, v)[1])
    assert calls and attn.kernels_checked() == {"wrong(float32, masked=False)": False, "broken(float32, masked=False)": False,
                                                "good(float32, masked=False)": True}
    assert "unusable" in caplog.text and "no kernel image" in caplog.text
    monkeypatch.setattr(attn, "candidates", lambda q, masked: ["wrong"])
    torch.testing.assert_close(attn.sdpa_lse(q, k, v)[1], attn.math_lse(q, k, v)[1])  # checked once, then math


def test_long_contexts_run_unmasked_per_length(monkeypatch):
    seq_lens, ctx_lens, rows = [6, 6, 6, 6], [9, 4, 9, 0], [0, 1, 2, 3]
    q, k, v, cache = _case(seq_lens, ctx_lens, rows, seed=4)
    want = attention(q, k, v, make_plan(seq_lens, ctx_lens=ctx_lens, rows=rows), cache, 0)
    short = make_plan(seq_lens, ctx_lens=ctx_lens, rows=rows, split=True)
    assert [(p.lc, p.mask is not None) for p in short.groups[0].parts] == [(9, True)]
    monkeypatch.setattr(attn, "LONG_CONTEXT", 8)
    long = make_plan(seq_lens, ctx_lens=ctx_lens, rows=rows, split=True)
    assert [(p.sub.tolist(), p.lc, p.mask) for p in long.groups[0].parts] == [([0, 2], 9, None), ([1], 4, None)]
    torch.testing.assert_close(attention(q, k, v, long, cache, 0), want, atol=1e-5, rtol=1e-5)


def test_kernel_failing_on_a_real_call_is_dropped(monkeypatch, caplog):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)

    def small_only(q, k, v, mask):
        if q.shape[2] > 4:
            raise RuntimeError("unsupported sequence length")
        return attn.math_lse(q, k, v, mask)

    monkeypatch.setattr(attn, "KERNELS", {"small_only": small_only})
    monkeypatch.setattr(attn, "_VERIFIED", {})
    monkeypatch.setattr(attn, "candidates", lambda q, masked: ["small_only"])
    monkeypatch.setattr(attn, "_works", lambda name, q, k, masked: attn._VERIFIED.setdefault(
        (name, q.device.type, q.dtype, q.shape[1], k.shape[1], q.shape[3], masked), True))
    attn.sdpa_lse(q, k, v)
    big = torch.randn(1, 2, 9, 8, generator=g)
    out, lse = attn.sdpa_lse(big, k, v)  # raises inside: math instead, and the kernel is dropped
    torch.testing.assert_close(lse, attn.math_lse(big, k, v)[1])
    assert list(attn._VERIFIED.values()) == [False] and "failed" in caplog.text
