"""The module tree of the released BAGEL-7B-MoT, built on the meta device, matches the
released checkpoint's tensor names and shapes exactly."""

import json

import pytest
import torch

from modeling.bagel.autoencoder import AutoEncoder, AutoEncoderParams
from modeling.bagel.model import PRESETS, Bagel
from tests.conftest import FIXTURES, shared_fixture

SHAPES = FIXTURES / "bagel-7b-mot.shapes.json"

@pytest.fixture(autouse=True)
def _needs_fixture():
    shared_fixture("bagel-7b-mot.shapes.json")


def _shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_7b_layout_matches_release():
    want = json.loads(SHAPES.read_text())
    with torch.device("meta"):
        model = Bagel(PRESETS["bagel-7b-mot"])
        ae = AutoEncoder(AutoEncoderParams())
    got = _shapes(model)
    assert sorted(set(want["ema.safetensors"]) - set(got)) == []
    assert sorted(set(got) - set(want["ema.safetensors"])) == []
    assert got == want["ema.safetensors"]
    assert _shapes(ae) == want["ae.safetensors"]
    n = sum(v.numel() for v in model.state_dict().values())
    assert 14.0e9 < n < 15.0e9


def test_ae_params_read_off_shapes():
    want = json.loads(SHAPES.read_text())["ae.safetensors"]
    p = AutoEncoderParams.from_shapes({k: tuple(v) for k, v in want.items()})
    assert (p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.downsample) == (128, [1, 2, 4, 4], 2, 16, 8)
