"""Batched sampling equals row-by-row sampling (float32, CPU), for rows that mix prompts,
sizes, tasks, step counts and every CFG setting."""

import pytest
import torch

from modeling.bagel import context
from modeling.bagel import sampling as S
from modeling.bagel.load import load_bagel, load_tokenizer
from modeling.bagel.tiny import write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny(tmp_path_factory.mktemp("bagel") / "tiny", seed=3)
    tok, special = load_tokenizer(d)
    return load_bagel(d), tok, special


def _noise(model, h, w, seed):
    return S.get_noise(model, h, w, torch.Generator().manual_seed(seed))


def _rows(model, tok):
    P = S.ImageParams
    g = torch.Generator().manual_seed(7)
    edit_latent = torch.randn(16, 4, 6, generator=g)
    vit = torch.randn(12, 588, generator=g)
    return [
        S.ImageRow(tok.encode("a red cube on a table"), 32, 48, _noise(model, 32, 48, 1), P(num_timesteps=6)),
        S.ImageRow(tok.encode("a cat"), 48, 32, _noise(model, 48, 32, 2),
                   P(cfg_img_scale=1.5, cfg_interval=(0.0, 1.0), cfg_renorm_type="channel", cfg_renorm_min=0.3,
                     timestep_shift=1.0, num_timesteps=5)),
        S.ImageRow(tok.encode("no guidance at all"), 32, 32, _noise(model, 32, 32, 3), P(cfg_text_scale=1.0, num_timesteps=4)),
        S.ImageRow(tok.encode("make it blue"), 32, 48, _noise(model, 32, 48, 4),
                   S.replace(S.EDIT_DEFAULTS, num_timesteps=5), edit_latent, vit, (3, 4)),
        S.ImageRow(tok.encode("a red cube on a table"), 16, 16, _noise(model, 16, 16, 5),
                   P(cfg_text_scale=2.5, cfg_renorm_type="text_channel", timestep_shift=2.0, num_timesteps=8)),
    ]


def test_batched_denoise_equals_single(tiny):
    model, tok, special = tiny
    rows = _rows(model, tok)
    batched = S.denoise(model, rows, special)
    for row, xb in zip(rows, batched):
        (xs,) = S.denoise(model, [row], special)
        assert xb.shape == xs.shape
        rel = float((xb - xs).norm() / xs.norm())
        assert rel <= 1e-4, rel
    assert float((batched[0] - batched[4][:1]).abs().sum()) > 0  # rows really differ


def test_uncond_branches_only_when_cfg_active(tiny):
    model, tok, special = tiny
    row = _rows(model, tok)[0]  # cfg_interval (0.4, 1]: late steps run the conditional branch alone
    row = S.replace(row, params=S.ImageParams(num_timesteps=12))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        S.denoise(model, [row], special)
    finally:
        hook.remove()
    t, _ = S.schedule(row.params.num_timesteps, row.params.timestep_shift)
    n = 2 * 3 + 2  # 32x48 image -> 2x3 latent tokens + boundary tokens
    want = [n * (2 if bool(ti > 0.4) and bool(ti <= 1.0) else 1) for ti in t]  # float32, as the reference
    assert calls[1:] == want  # calls[0] is the context prefill
    assert 0 < sum(c == n for c in calls[1:]) < len(want)


def test_batched_text_equals_single(tiny):
    model, tok, special = tiny
    g = torch.Generator().manual_seed(0)
    vit = torch.randn(6, 588, generator=g)
    rows = lambda: [  # noqa: E731
        S.TextRow(tok.encode("what is in the picture?"), vit, (2, 3), max_new_tokens=7),
        S.TextRow(tok.encode("describe"), None, None, max_new_tokens=4),
        S.TextRow(tok.encode("how many apples are on the plate?"), vit, (3, 2), max_new_tokens=6, do_sample=True,
                  temperature=0.7, generator=torch.Generator().manual_seed(11)),
    ]
    batched = S.generate_text(model, rows(), special)
    single = [S.generate_text(model, [r], special)[0] for r in rows()]
    assert batched == single
    assert [len(o) <= m for o, m in zip(batched, (7, 4, 6))] == [True] * 3
    assert any(batched)


def test_bad_inputs_raise(tiny):
    model, tok, special = tiny
    with pytest.raises(ValueError, match="multiples of 16"):
        S.get_noise(model, 30, 32, torch.Generator())
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        S.ImageParams(cfg_renorm_type="nope")
    bad = S.ImageRow([1], 32, 32, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="noise"):
        S.denoise(model, [bad], special)


def test_chunked_prefill_and_shared_contexts(tiny, monkeypatch):
    model, tok, special = tiny
    rows = _rows(model, tok)
    rows.append(S.ImageRow(rows[0].prompt_ids, 32, 48, _noise(model, 32, 48, 9), rows[0].params))  # same prompt
    want = S.denoise(model, rows, special)
    monkeypatch.setattr(context, "PREFILL_CHUNK_TOKENS", 8)  # one context per prefill forward
    got = S.denoise(model, rows, special)
    for a, b in zip(want, got):
        assert float((a - b).norm() / b.norm()) <= 1e-4
    ctx = S.Contexts(model, [c for r in rows for c in S.image_contexts(r).values()], special, share=True)
    assert len(ctx.cache.lens) < 3 * len(rows)  # empty and repeated contexts share cache rows
    assert ctx.cache.k[0].shape[0] == sum(max(1, n) for n in ctx.cache.lens)  # rows packed, no padding


@pytest.mark.parametrize("long_context", [256, 1])  # 1: every context counts as long (one call per length)
def test_split_attention_equals_masked_in_denoise(tiny, monkeypatch, long_context):
    from modeling.bagel import attn

    model, tok, special = tiny
    rows = _rows(model, tok)
    monkeypatch.setattr(attn, "LONG_CONTEXT", long_context)
    split = S.denoise(model, rows, special, attention="split")
    masked = S.denoise(model, rows, special, attention="masked")
    for a, b in zip(split, masked):
        assert float((a - b).norm() / b.norm()) <= 1e-5
    with pytest.raises(ValueError, match="attention"):
        S.denoise(model, rows, special, attention="flash")


def test_compiled_blocks_give_the_same_latents(tmp_path):
    d = write_tiny(tmp_path / "tiny", seed=3)
    tok, special = load_tokenizer(d)
    model = load_bagel(d)
    rows = _rows(model, tok)[:2]
    want = S.denoise(model, rows, special)
    model.compile_blocks()
    got = S.denoise(model, rows, special)
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) <= 1e-5


@pytest.mark.parametrize("patch", [0.0, 1.0])
def test_routing_by_patching_the_minority_expert(tiny, monkeypatch, patch):
    from modeling.bagel import model as M

    model, tok, special = tiny
    rows = _rows(model, tok)
    want = S.denoise(model, rows, special)  # small images: boundary tokens are >= 1/32 of each forward
    monkeypatch.setattr(M, "MINORITY_PATCH", patch)  # 1.0: always run one expert over all tokens
    got = S.denoise(model, rows, special)
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) <= 1e-5
