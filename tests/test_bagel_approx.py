"""The optional approximate speed-ups of BAGEL (FP8 GEMMs, the step cache): off by default,
really approximate when on, and close to the exact path (float32, CPU). Their speed and
drift at the released size are measured on the GPU (bench/bench_bagel.py --approx)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from modeling.bagel import sampling as S
from modeling.bagel.load import load_bagel, load_tokenizer
from modeling.bagel.quant import E4M3_MAX, Fp8Linear, check_quantize, quantize_llm
from modeling.bagel.tiny import write_tiny
from pipeline.families.bagel import EditParams, T2IParams
from tests.family_harness import Stages, make_sample


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bagel") / "tiny", seed=3)


@pytest.fixture(scope="module")
def tiny(ckpt):
    tok, special = load_tokenizer(ckpt)
    return load_bagel(ckpt), tok, special


def _rows(model, tok, params, prompts=("a red cube on a table", "a cat")):
    return [S.ImageRow(tok.encode(p), 32, 32, S.get_noise(model, 32, 32, torch.Generator().manual_seed(i)), params)
            for i, p in enumerate(prompts)]


def _rel(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


def test_off_by_default():
    assert S.T2I_DEFAULTS.step_cache_interval == 1 and S.EDIT_DEFAULTS.step_cache_interval == 1
    assert T2IParams().image() == S.T2I_DEFAULTS
    assert EditParams().image() == S.EDIT_DEFAULTS
    with pytest.raises(ValueError, match="step_cache_interval"):
        S.ImageParams(step_cache_interval=0)


def test_fp8_linear_is_close_to_the_linear_and_stores_one_byte_per_weight():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
        lin.bias.normal_(0, 0.05, generator=g)
    q = Fp8Linear(lin, "cpu")
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.element_size() == 1
    assert tuple(q.weight.shape) == (80, 96) and tuple(q.weight_scale.shape) == (1, 80)
    # every output channel uses the format's whole range
    assert torch.allclose(q.weight.float().abs().amax(dim=1), torch.full((80,), E4M3_MAX))
    x = torch.randn(3, 7, 96, generator=g)
    with torch.no_grad():
        want, got = lin(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 0.05, rel  # quantised (not the same numbers), to e4m3's ~2^-4 relative step


def test_fp8_scales_each_token_on_its_own():
    """One huge token (an outlier activation) must not cost the other tokens their precision."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
    q = Fp8Linear(lin, "cpu")
    x = torch.randn(8, 64, generator=g)
    x_out = x.clone()
    x_out[0] *= 1e6  # one tensor-wide scale would flush the other tokens to e4m3 zero
    with torch.no_grad():
        for a, b in ((q(x)[1:], lin(x)[1:]), (q(x_out)[1:], lin(x_out)[1:])):
            assert float((a - b).norm() / b.norm()) < 0.05


def test_quantize_llm_fp8_replaces_every_decoder_linear_and_stays_close(tiny):
    model, tok, special = tiny
    q = quantize_llm(copy.deepcopy(model), "fp8", "cpu")
    layers = q.language_model.model.layers
    n_lin = sum(type(m) is nn.Linear for m in model.language_model.model.layers.modules())
    assert n_lin == 14 * len(layers)  # q/k/v/o + gate/up/down, for each of the two experts
    assert sum(type(m) is Fp8Linear for m in layers.modules()) == n_lin
    assert not any(type(m) is nn.Linear for m in layers.modules())
    assert type(q.language_model.lm_head) is nn.Linear and type(q.vae2llm) is nn.Linear  # outside the layers
    params = S.ImageParams(num_timesteps=8)
    exact = S.denoise(model, _rows(model, tok, params), special)
    fp8 = S.denoise(q, _rows(q, tok, params), special)
    rel = _rel(fp8, exact)
    assert 0 < rel < 0.1, rel
    unrelated = S.denoise(model, _rows(model, tok, params, ("something else", "entirely")), special)
    assert _rel(unrelated, exact) > 10 * rel  # close means closer than another prompt's image


def test_stages_take_quantize_fp8_and_a_row_step_cache(ckpt):
    """The job's way in: the lmm option quantize=fp8 and the rows' step_cache_interval."""
    options = {"vae_transform": [64, 32, 16], "vit_transform": [56, 28, 14], "emit_latents": True}
    check_quantize("fp8", "cpu")
    rows = [make_sample("bagel", "t2i", sample_seed=7, params={"num_timesteps": 12, **extra}, width=32, height=32)
            for extra in ({}, {"step_cache_interval": 3})]
    exact, fp8 = Stages("bagel", str(ckpt), options), Stages("bagel", str(ckpt), {**options, "quantize": "fp8"})
    latent = lambda s: s.outputs.embeddings["bagel_latent"]  # noqa: E731
    base, cached = exact(rows)
    (quantised,) = fp8(rows[:1])
    assert all(s.failure is None for s in (base, cached, quantised))
    for other in (cached, quantised):
        rel = float(np.linalg.norm(latent(other) - latent(base)) / np.linalg.norm(latent(base)))
        assert 0 < rel < 0.1, rel


def _denoising_forwards(model, rows, special):
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        S.denoise(model, rows, special)
    finally:
        hook.remove()
    return calls[1:]  # calls[0] is the context prefill


N_IMG = 2 + (32 // 16) ** 2  # a 32x32 row's tokens per branch: start/end + its 2x2 latent grid


def test_step_cache_skips_the_steps_it_says(tiny):
    """12 timesteps = 11 steps, CFG on for all of them (interval [0, 1]): warm-up steps 0, 1, 2
    are computed, then every 3rd (5, 8); steps 3, 4, 6, 7, 9, 10 are extrapolated."""
    model, tok, special = tiny
    params = S.ImageParams(num_timesteps=12, cfg_interval=(0.0, 1.0), step_cache_interval=3)
    assert _denoising_forwards(model, _rows(model, tok, params), special) == [2 * 2 * N_IMG] * 5


def test_step_cache_recomputes_when_cfg_turns_off(tiny):
    """Interval (0.6, 1] with 12 timesteps, shift 3: CFG is on for steps 0..7 and off for 8..10.
    Warm-up 0, 1, 2; then 5; step 8 changes the branches (computed), so does 9 (a second point
    under the new branches); 10 is extrapolated."""
    model, tok, special = tiny
    t, _ = S.schedule(12, 3.0)
    assert [bool(v > 0.6) for v in t] == [True] * 8 + [False] * 3  # the premise, from the schedule
    params = S.ImageParams(num_timesteps=12, cfg_interval=(0.6, 1.0), step_cache_interval=3)
    assert _denoising_forwards(model, _rows(model, tok, params), special) == [2 * 2 * N_IMG] * 4 + [2 * N_IMG] * 2


def test_step_cache_is_close_and_interval_one_is_exact(tiny):
    model, tok, special = tiny
    exact = S.denoise(model, _rows(model, tok, S.ImageParams(num_timesteps=20)), special)
    same = S.denoise(model, _rows(model, tok, S.ImageParams(num_timesteps=20, step_cache_interval=1)), special)
    assert all(torch.equal(a, b) for a, b in zip(same, exact))
    drift = [_rel(S.denoise(model, _rows(model, tok, S.ImageParams(num_timesteps=20, step_cache_interval=k)),
                            special), exact) for k in (2, 4)]
    assert 0 < drift[0] < drift[1] < 0.05, drift  # approximate, more so the more it skips


def test_rows_with_and_without_the_cache_share_a_batch(tiny):
    model, tok, special = tiny
    exact, cached = S.ImageParams(num_timesteps=10), S.ImageParams(num_timesteps=10, step_cache_interval=3)
    a, b = _rows(model, tok, exact)
    mixed = S.denoise(model, [a, S.replace(b, params=cached)], special)
    assert _rel([mixed[0]], S.denoise(model, [a], special)) < 1e-4  # the exact row stays exact
    assert _rel([mixed[1]], S.denoise(model, [S.replace(b, params=cached)], special)) < 1e-4


def test_step_cache_extrapolation_is_exact_for_a_velocity_linear_in_t():
    c = S.StepCache(interval=3, warmup=2)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    for step, t in enumerate((1.0, 0.9)):
        assert c.computes(step, ("gen",))
        c.record(step, t, ("gen",), a + b * t)
    assert not c.computes(2, ("gen",)) and c.computes(2, ("gen", "text"))
    torch.testing.assert_close(c.predict(0.7), a + b * 0.7)
