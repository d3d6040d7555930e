"""Emu diffusion side: parity against the kits (kit prompt_embeds, recorded noise replayed), guidance,
batching and per-row randomness on a tiny random decoder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling.emu import diffusion as D
from modeling.emu.decoder import load_decoder, write_tiny_decoder
from tests.conftest import shared_fixture

TOL = 1e-4
KITS = {"emu2-tiny": "emu2", "emu1-tiny": "emu1"}
CASES = [("emu2-tiny", c) for c in ("t2i_cfg", "img_text", "t2i_noguide", "autoencode")] + \
        [("emu1-tiny", c) for c in ("t2i_cfg", "incontext", "t2i_noguide")]
_KITS: dict = {}


def kit(name):
    path = shared_fixture(name)
    if name not in _KITS:
        cases = {c["id"]: c for c in json.loads((path / "kit.json").read_text())["cases"]}
        _KITS[name] = (path, load_decoder(path, KITS[name], safety_checker=True),
                       load_file(str(path / "tensors.safetensors")), cases)
    return _KITS[name]


def split(pe: torch.Tensor, guided: bool):
    return (pe[:1], pe[1:]) if guided else (pe, None)


@pytest.mark.parametrize("kit_name,cid", CASES)
def test_kit_case(kit_name, cid):
    path, dec, t, cases = kit(kit_name)
    case, p = cases[cid], cases[cid]["params"]
    g = float(p["guidance_scale"])
    cond, uncond = split(t[f"{cid}.prompt_embeds"], g > 1)
    kw = {k: tuple(p[k]) for k in ("original_size", "crop_info") if k in p}
    lat, tr = D.denoise(dec, cond, uncond, height=p["height"], width=p["width"], steps=p["num_inference_steps"],
                        guidance=g, noise=D.replay_noise(t[n] for n in case["noise_stream"]), return_trace=True, **kw)
    err = lambda a, name: D.rel_l2(a, t[f"{cid}.{name}"])
    assert torch.equal(tr["timesteps"].cpu(), t[f"{cid}.timesteps"])
    if KITS[kit_name] == "emu2":
        assert err(tr["sigmas"], "sigmas") < 1e-6
        assert torch.equal(tr["time_ids"].flatten().cpu(), t[f"{cid}.time_ids"])
        assert err(tr["text_embeds"], "text_embeds") < 1e-6
    n_calls = len(t[f"{cid}.timesteps"])
    assert len(tr["unet_out"]) == n_calls  # Emu1: PNDM makes steps + 1 calls
    assert tr["unet_in"][0].shape[0] == (2 if g > 1 else 1)
    assert err(tr["unet_in"][0], "unet_in.0000") < TOL
    for i in range(n_calls):
        assert err(tr["unet_out"][i], f"unet_out.{i:04d}") < TOL, i
        assert err(tr["latents"][i], f"latents.{i:04d}") < TOL, i
    assert err(lat, "final_latent") < TOL
    pixels, decoded = D.decode(dec, lat)
    assert err(decoded, "decoded") < TOL
    png = np.asarray(Image.open(path / case["output_image"]).convert("RGB")).astype(int)
    assert np.abs(pixels[0].numpy().astype(int) - png).max() <= 1
    # the CLIP preprocessing, on the reference's own uint8 image, and the flags
    ref_u8 = torch.from_numpy(png.astype(np.uint8))[None]
    assert D.rel_l2(D.safety_inputs(dec, ref_u8), t[f"{cid}.safety_pixel_values"]) < 1e-6
    assert D.safety_check(dec, ref_u8) == [case["nsfw_content_detected"]]


def test_decoder_case_errors():
    path, dec, t, cases = kit("emu2-tiny")
    errs = D.decoder_case_errors(path, "t2i_cfg", dec, *split(t["t2i_cfg.prompt_embeds"], True))
    assert errs["final_latent"] < TOL and errs["decoded"] < TOL and errs["pixels"] <= 1
    assert errs["safety_pixel_values"] < 1e-2  # a ±1 pixel moves it


@pytest.fixture(scope="module", params=["emu2", "emu1"])
def tiny(request, tmp_path_factory):
    d = write_tiny_decoder(tmp_path_factory.mktemp(request.param), request.param, context_dim=24, seed=3)
    return load_decoder(d, request.param, safety_checker=True)


def _ctx(seed, rows=1, n=5, d=24):
    return torch.randn(rows, n, d, generator=torch.Generator().manual_seed(seed))


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_batched_rows_equal_single_rows(tiny):
    cond, uncond = _ctx(1, 3), _ctx(2)
    scales, seeds = [3.0, 5.0, 1.0], [11, 12, 13]
    kw = dict(height=32, width=48, steps=3)
    both = D.denoise(tiny, cond, uncond, guidance=torch.tensor(scales), generators=_gens(seeds), **kw)
    for i in range(3):
        alone = D.denoise(tiny, cond[i:i + 1], uncond, guidance=scales[i], generators=_gens(seeds[i:i + 1]), **kw)
        assert D.rel_l2(both[i:i + 1], alone) < TOL, i
    # guidance matters (the two guided rows differ from an unguided run)
    plain = D.denoise(tiny, cond[:1], None, guidance=1.0, generators=_gens(seeds[:1]), **kw)
    assert D.rel_l2(both[:1], plain) > 1e-3


def test_generator_row_independent_of_batch(tiny):
    kw = dict(height=32, width=32, steps=2, guidance=1.0)
    a = D.denoise(tiny, _ctx(5, 2), None, generators=_gens([7, 8]), **kw)
    b = D.denoise(tiny, torch.cat([_ctx(6), _ctx(5, 2)[:1]]), None, generators=_gens([9, 7]), **kw)
    assert D.rel_l2(a[:1], b[1:]) < TOL
    assert D.rel_l2(a[1:], b[:1]) > 1e-2


def test_noise_source_order_and_no_uncond_pass(tiny):
    shapes = []

    def noise(shape):
        shapes.append(shape)
        return torch.randn(shape, generator=torch.Generator().manual_seed(len(shapes)))

    _, tr = D.denoise(tiny, _ctx(1), _ctx(2), height=32, width=32, steps=3, guidance=1.0, noise=noise,
                      return_trace=True)
    assert all(x.shape[0] == 1 for x in tr["unet_in"])  # guidance 1: the uncond branch never runs
    assert len(shapes) == (1 + 3 if tiny.variant == "emu2" else 1)  # Emu2: one discarded draw per Euler step
    assert len(tr["unet_out"]) == (3 if tiny.variant == "emu2" else 4)


def test_decode_and_safety_flags(tiny):
    lat = D.denoise(tiny, _ctx(1, 2), None, height=32, width=32, steps=1, guidance=1.0, generators=_gens([1, 2]))
    pixels, img = D.decode(tiny, lat)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8 and img.dtype == torch.float32
    assert torch.equal(pixels, (img * 255).round().to(torch.uint8))
    assert D.safety_check(tiny, img) == [False, False]
    sc = tiny.safety_checker
    old = sc.concept_embeds_weights.clone()
    try:
        sc.concept_embeds_weights.data.fill_(-2.0)
        before = pixels.clone()
        assert D.safety_check(tiny, pixels) == [True, True]
        assert torch.equal(pixels, before)  # flags only: nothing blacked out
    finally:
        sc.concept_embeds_weights.data.copy_(old)


def test_boundary_errors(tiny):
    kw = dict(height=32, width=32, steps=1, generators=_gens([1]))
    with pytest.raises(ValueError, match="needs uncond"):
        D.denoise(tiny, _ctx(1), None, guidance=3.0, **kw)
    with pytest.raises(ValueError, match="cond must be"):
        D.denoise(tiny, _ctx(1, d=16), None, guidance=1.0, **kw)
    with pytest.raises(ValueError, match="multiples of 8"):
        D.denoise(tiny, _ctx(1), None, guidance=1.0, **{**kw, "height": 36})
    with pytest.raises(ValueError, match="2 scales for 1 rows"):
        D.denoise(tiny, _ctx(1), _ctx(2), guidance=[2.0, 3.0], **kw)
    with pytest.raises(ValueError, match="exactly one"):
        D.denoise(tiny, _ctx(1), None, guidance=1.0, noise=lambda s: torch.zeros(s), **kw)
    with pytest.raises(ValueError, match="2 generators for 1 rows"):
        D.denoise(tiny, _ctx(1), None, guidance=1.0, **{**kw, "generators": _gens([1, 2])})
