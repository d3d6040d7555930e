"""The lean RMSNorm and RoPE give the bits of their textbook (Qwen2) formulas."""

import pytest
import torch

from modeling.bagel.layers import RMSNorm, apply_rope, rope_cos_sin


def _rope_ref(x, cos, sin):
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def _norm_ref(m, x):
    h = x.float()
    return m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_and_rmsnorm_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(257, 5, 64, generator=g)).to(dtype)
    cos, sin = rope_cos_sin(torch.randint(0, 9000, (257,), generator=g), 64, 1e6)
    assert torch.equal(apply_rope(x, cos, sin), _rope_ref(x, cos, sin))
    m = RMSNorm(64).to(dtype)
    m.weight.data.uniform_(0.5, 2.0, generator=g)
    got, want = m(x), _norm_ref(m, x)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the float32 variance may differ in its last bit: a rare 1-ulp flip after rounding
        assert float((got != want).float().mean()) < 1e-3
        torch.testing.assert_close(got, want)
