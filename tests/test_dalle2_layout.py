"""The LAION release layout (dalle2-pytorch ~1.1) maps exactly onto our modules after the remaps."""

import json

import pytest
import torch

from modeling.dalle2.convert import (
    decoder_params,
    downsample_kinds,
    prior_params,
    remap_decoder,
    remap_prior,
)
from modeling.dalle2.decoder import Decoder
from modeling.dalle2.presets import LAION_DECODER_V102, LAION_PRIOR
from modeling.dalle2.prior import DiffusionPriorNetwork
from tests.conftest import FIXTURES, shared_fixture

SHAPES = FIXTURES / "dalle2-laion-v1.0.2.shapes.json"

@pytest.fixture(autouse=True)
def _needs_fixture():
    shared_fixture("dalle2-laion-v1.0.2.shapes.json")


def _release(kind: str) -> dict[str, torch.Tensor]:
    data = json.loads(SHAPES.read_text())
    (section,) = [v for k, v in data.items() if k.startswith(kind)]
    return {k: torch.empty(shape, device="meta") for k, shape in section.items()}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_laion_decoder_v102_layout():
    sd = _release("decoder")
    assert downsample_kinds(sd, 1) == ["conv"]  # Conv2d(k4, s2) downsampling in the release
    p = decoder_params(LAION_DECODER_V102, downsample_kinds(sd, 1))
    remapped = remap_decoder(sd, p, [1])
    assert not any(".cross_attn.fn." in k for k in remapped)
    with torch.device("meta"):
        model = Decoder(p)
    assert _shapes(model.state_dict()) == _shapes(remapped)
    n = sum(v.numel() for v in model.parameters())
    assert 950e6 < n < 1000e6, n


def test_laion_prior_layout():
    sd = _release("prior")
    p = prior_params(LAION_PRIOR)
    remapped, guidance_trained = remap_prior(sd, p)
    assert not guidance_trained  # pre-1.9 prior: null_text_embed only, cond_scale must stay 1
    release_keys = {k[4:] for k in sd if k.startswith("net.")}
    added = set(remapped) - release_keys
    assert added == {"null_text_encodings", "null_text_embeds", "null_image_embed"}
    with torch.device("meta"):
        model = DiffusionPriorNetwork(p)
    assert _shapes(model.state_dict()) == _shapes(remapped)
    assert 100e6 < sum(v.numel() for v in model.parameters()) < 103e6
