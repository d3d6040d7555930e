"""Samplers: per-sample noise makes batched == one by one; guidance is one forward; draw order."""

import pytest
import torch

from modeling.dalle2.convert import decoder_params, prior_params
from modeling.dalle2.decoder import Decoder
from modeling.dalle2.prior import DiffusionPriorNetwork
from modeling.dalle2.sampling import per_sample_noise, sample_decoder, sample_prior, sample_unet
from modeling.dalle2.tiny import DECODER, PRIOR, _randomize

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


@pytest.fixture(autouse=True)
def _fast_cpu_math():
    """No autograd, and denormals flushed (random tiny weights underflow), for this module's
    tests only: torch's defaults are back after each."""
    torch.set_flush_denormal(True)
    with torch.no_grad():
        yield
    torch.set_flush_denormal(False)


def _prior(**over):
    m = DiffusionPriorNetwork(prior_params({**PRIOR, **over}))
    _randomize(m, G(0))
    return m.eval()


def _decoder(**over):
    m = Decoder(decoder_params({**DECODER, **over}))
    _randomize(m, G(1))
    return m.eval()


def _text(b, seed=5):
    te = torch.nn.functional.normalize(torch.randn(b, 32, generator=G(seed)), dim=-1)
    enc = torch.randn(b, 12, 32, generator=G(seed + 1))
    for i in range(b):
        enc[i, 3 + 2 * i:] = 0  # different lengths
    return te, enc


class Counter:
    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, shape):
        self.shapes.append(tuple(shape))
        return self.fn(shape)


def test_prior_batched_equals_single_and_rerank():
    prior, (te, enc) = _prior(), _text(3)
    seeds = [11, 12, 13]
    kw = dict(steps=6, cond_scale=2.0, eta=1.0, num_samples_per_batch=2)
    batched = sample_prior(prior, te, enc, per_sample_noise([G(s) for s in seeds]), **kw)
    for i, s in enumerate(seeds):
        one = sample_prior(prior, te[i:i + 1], enc[i:i + 1], per_sample_noise([G(s)]), **kw)
        torch.testing.assert_close(batched[i:i + 1], one, atol=1e-5, rtol=1e-4)
    # the kept embedding is the candidate closest to the text embedding
    both = sample_prior(prior, te.repeat_interleave(2, 0), enc.repeat_interleave(2, 0),
                        per_sample_noise([G(s) for s in seeds]), **{**kw, "num_samples_per_batch": 1})
    sims = torch.nn.functional.cosine_similarity(both, te.repeat_interleave(2, 0)).view(3, 2)
    torch.testing.assert_close(batched, both.view(3, 2, -1)[torch.arange(3), sims.argmax(1)], atol=1e-5, rtol=1e-4)


def test_prior_ddpm_draws_and_guidance_guard():
    prior, (te, enc) = _prior(timesteps=20, net={**PRIOR["net"], "num_timesteps": 20}), _text(2)
    noise = Counter(per_sample_noise([G(1), G(2)]))
    sample_prior(prior, te, enc, noise, steps=20, cond_scale=1.0)
    assert len(noise.shapes) == 21  # initial + one per DDPM step (t = 0 included, as the reference)
    prior.params.guidance_trained = False
    try:
        sample_prior(prior, te, enc, noise, steps=4, cond_scale=2.0)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "cond_scale" in str(e)


def test_decoder_batched_equals_single_with_one_guided_forward():
    dec = _decoder()
    unets = list(dec.unets)
    emb, (_, enc) = torch.nn.functional.normalize(torch.randn(3, 32, generator=G(7)), dim=-1), _text(3)
    seeds = [21, 22, 23]
    batches = []
    hook = unets[0].register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    out = sample_decoder(unets, dec.params, emb, enc, per_sample_noise([G(s) for s in seeds]), cond_scale=[2.0, 1.0],
                         steps=[5, 4])
    hook.remove()
    assert out.shape == (3, 3, 32, 32)
    assert batches == [6] * 5  # cond + null branches in one forward per step
    for i, s in enumerate(seeds):
        one = sample_decoder(unets, dec.params, emb[i:i + 1], enc[i:i + 1], per_sample_noise([G(s)]),
                             cond_scale=[2.0, 1.0], steps=[5, 4])
        torch.testing.assert_close(out[i:i + 1], one, atol=1e-4, rtol=1e-4)


def test_repaint_draw_order_and_known_pixels():
    dec = _decoder(timesteps=10, sample_timesteps=None)
    unet, p = dec.unets[0], dec.params
    emb, (_, enc) = torch.randn(2, 32, generator=G(3)), _text(2)
    image = torch.rand(2, 3, 16, 16, generator=G(4))
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[:, :8] = True  # keep the top half
    noise = Counter(per_sample_noise([G(1), G(2)]))
    out = sample_unet(unet, p, 1, emb, enc, noise, steps=10, cond_scale=1.5, inpaint_image=image, inpaint_mask=mask,
                      inpaint_resample_times=3)
    T, R = 10, 3
    assert len(noise.shapes) == 1 + T * R + T * R + (T - 1) * (R - 1)  # init, paste, step, renoise
    torch.testing.assert_close(out[:, :, :8], image[:, :, :8], atol=1e-6, rtol=0)
    noise = Counter(per_sample_noise([G(1), G(2)]))
    sample_unet(unet, p, 1, emb, enc, noise, steps=4, inpaint_image=image, inpaint_mask=mask, inpaint_resample_times=2)
    P = 4
    assert len(noise.shapes) == 1 + P * R - P + (P - 1) * 2 + (P - 1)  # DDIM: init, paste, step, renoise


def test_upsampler_lowres_noise_augmentation_draws_first():
    dec = _decoder()
    prev = torch.rand(2, 3, 16, 16, generator=G(9))
    noise = Counter(per_sample_noise([G(1), G(2)]))
    a = sample_unet(dec.unets[1], dec.params, 2, None, None, noise, prev_image=prev, steps=3)
    assert len(noise.shapes) == 1 + 1 + 2 and noise.shapes[0] == (2, 3, 32, 32)
    b = sample_unet(dec.unets[1], dec.params, 2, None, None, per_sample_noise([G(1), G(2)]), prev_image=prev, steps=3,
                    lowres_noise_level=0.5)
    assert not torch.allclose(a, b)
