"""The pipeline split by layer (modeling/layer_split.py) on BAGEL's LLM, with CPU devices standing in
for GPUs: the same latents and tokens as the unsplit model (fp32, 1e-6), activations really handed
over at each cut (counted by a hand-off hook), the KV cache's layers on their layers' devices, and
the lmm stage option `split_devices` through the family's own stage."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.bagel.load import SpecialTokens
from modeling.bagel.sampling import ImageParams, ImageRow, TextRow, denoise, generate_text, get_noise
from modeling.bagel.tiny import random_bagel, tiny_params, write_tiny
from modeling.layer_split import balanced_runs, devices_for
from pipeline.families.bagel import build_lmm
from pipeline.family import StageContext
from tests.family_harness import Stages, make_sample

SPECIAL = SpecialTokens(bos_token_id=1, eos_token_id=2, start_of_image=3, end_of_image=4)
OPTIONS = {"vae_transform": [64, 32, 16], "vit_transform": [56, 28, 14], "emit_latents": True, "vae_dtype": "float32"}


def test_runs_are_contiguous_and_balanced():
    for n_layers, n_devices in [(5, 2), (5, 3), (4, 4), (28, 3), (1, 1)]:
        runs = balanced_runs(n_layers, n_devices)
        assert [i for run in runs for i in run] == list(range(n_layers))
        sizes = [len(run) for run in runs]
        assert len(runs) == n_devices and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, sizes
    with pytest.raises(ValueError, match="cannot split 2 layers over 3 devices"):
        balanced_runs(2, 3)


@pytest.fixture(scope="module")
def model():
    return random_bagel(dataclasses.replace(tiny_params(512), num_layers=5), seed=3).eval()


def _rows(model):
    g = torch.Generator().manual_seed(0)
    images = [ImageRow([10, 11, 12, 13], 32, 32, get_noise(model, 32, 32, g), ImageParams(num_timesteps=3)),
              ImageRow([20, 21], 16, 32, get_noise(model, 16, 32, g), ImageParams(num_timesteps=3, cfg_renorm_type="channel"))]
    texts = [TextRow([30, 31, 32], max_new_tokens=6), TextRow([40, 41, 42, 43, 44], max_new_tokens=4)]
    return images, texts


@pytest.mark.parametrize("n_devices", [2, 3])
@torch.no_grad()
def test_split_forward_matches_unsplit(model, n_devices):
    images, texts = _rows(model)
    want_latents, want_tokens = denoise(model, images, SPECIAL), generate_text(model, texts, SPECIAL)

    split_model = copy.deepcopy(model)
    split = split_model.split_layers(["cpu"] * n_devices)  # n handles of one CPU: real cuts, real hand-offs
    forwards, handoffs = [], []
    split_model.register_forward_pre_hook(lambda m, args: forwards.append(1))
    split.register_handoff_hook(lambda layer, src, dst: handoffs.append(layer))
    got_latents, got_tokens = denoise(split_model, images, SPECIAL), generate_text(split_model, texts, SPECIAL)

    for want, got in zip(want_latents, got_latents):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got_tokens == want_tokens
    # each forward hands over at every cut (to the first layer of the next run) and once back home
    cuts = [run.start for run in split.runs[1:]]
    assert len(cuts) == n_devices - 1 and forwards
    assert handoffs == (cuts + [None]) * len(forwards)
    # the cache a split model makes keeps each layer's keys and values on that layer's device
    cache = split_model.new_cache([4, 4])
    assert [k.device for k in cache.k] == split.layer_devices() == [torch.device("cpu")] * 5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_tiny(tmp_path_factory.mktemp("bagel_split") / "tiny", seed=1))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_lmm_option_split_devices_gives_the_same_latents(ckpt):
    rows = [make_sample("bagel", "t2i", sample_seed=1000, params={"num_timesteps": 3}, row_id="a", width=32, height=32),
            make_sample("bagel", "understand", sample_seed=1001, params={"max_think_token_n": 4}, row_id="b", prompt="what?",
                        inputs={"image": _png()})]
    plain, split = Stages("bagel", ckpt, OPTIONS)(rows), Stages("bagel", ckpt, {**OPTIONS, "split_devices": 2})(rows)
    assert all(s.failure is None for s in plain + split), [s.failure for s in plain + split]
    np.testing.assert_allclose(split[0].outputs.embeddings["bagel_latent"], plain[0].outputs.embeddings["bagel_latent"],
                               rtol=0, atol=1e-6)
    assert split[1].outputs.text == plain[1].outputs.text


def test_split_devices_refused_with_a_reason(ckpt):
    for value in (0, "two", 1.5, True):
        with pytest.raises(ValueError, match=f"lmm option split_devices: expected a whole number of devices >= 1, got {value!r}"):
            build_lmm(StageContext(ckpt, "cpu", "float32", {"split_devices": value}))
    seen = torch.cuda.device_count()
    more = max(2, seen + 1)  # more GPUs than this process sees, whatever the machine (1 is no split)
    with pytest.raises(ValueError, match=f"{more} devices wanted, {seen} CUDA device\\(s\\) visible \\(give the stage num_gpus: {more}\\)"):
        devices_for("cuda", more)
    with pytest.raises(ValueError, match="quantize and split_devices do not combine"):
        build_lmm(StageContext(ckpt, "cpu", "float32", {"split_devices": 2, "quantize": "nf4"}))
