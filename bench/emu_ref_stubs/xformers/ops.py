"""`memory_efficient_attention` over torch's scaled_dot_product_attention.

xformers' layout is [B, M, H, K] (SDPA's is [B, H, M, K]); the result is [B, M, H, Kv]. Same math:
softmax(q k^T * scale + bias) v, scale defaulting to K ** -0.5, dropout p (the references pass 0 at
inference). attn_bias: None, a tensor broadcastable to [B, H, M, N], or LowerTriangularMask()."""

import torch.nn.functional as F


class LowerTriangularMask:
    """xformers' causal mask (top-left aligned for M == N, as the references use it)."""


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    causal = isinstance(attn_bias, LowerTriangularMask)
    mask = None if causal or attn_bias is None else attn_bias.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale)
    return o.transpose(1, 2)


fmha = None
