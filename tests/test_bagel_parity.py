"""Parity with the reference (ByteDance-Seed/Bagel) on the recorded tiny kit."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling.bagel import parity
from modeling.bagel.transforms import ResizeRule, prepare_image
from tests.conftest import FIXTURES, shared_fixture

KIT = FIXTURES / "bagel-tiny"

@pytest.fixture(autouse=True)
def _needs_fixture():
    shared_fixture("bagel-tiny/kit.json")


@pytest.mark.parametrize("batched", [False, True])
def test_parity_kit(batched):
    ok, lines = parity.run(KIT, batched=batched)
    assert ok, "\n".join(lines)


def test_parity_cli_exit_code(capsys):
    assert parity.main([str(KIT)]) == 0
    assert "PARITY OK" in capsys.readouterr().out


def test_transforms_match_kit():
    kit = json.loads((KIT / "kit.json").read_text())
    tensors = load_file(str(KIT / "tensors.safetensors"))
    vae_rule, vit_rule = ResizeRule(**kit["vae_transform"]), ResizeRule(**kit["vit_transform"])
    checked = 0
    for case in kit["cases"]:
        if "input_image" not in case:
            continue
        img = prepare_image(Image.open(KIT / case["input_image"]), vae_rule, vit_rule)
        vit = tensors[f"{case['id']}.vit_packed_pixel_values"]
        assert img.vit_patches.shape == vit.shape
        torch.testing.assert_close(img.vit_patches, vit, atol=1e-6, rtol=0)
        if f"{case['id']}.vae_pixels" in tensors:
            torch.testing.assert_close(img.vae_pixels[None], tensors[f"{case['id']}.vae_pixels"], atol=1e-6, rtol=0)
        checked += 1
    assert checked >= 2


def test_vae_encoder_explains_recorded_posterior_sample():
    """The kit's vae_latent is a posterior sample: under our encoder's mean/std the implied
    noise must look standard normal (a wrong encoder gives a visibly wider spread)."""
    from modeling.bagel.load import load_ae

    ae = load_ae(KIT)
    tensors = load_file(str(KIT / "tensors.safetensors"))
    edits = [k[: -len(".vae_latent")] for k in tensors if k.endswith(".vae_latent")]
    assert edits
    for cid in edits:
        with torch.no_grad():
            mean, logvar = ae.encoder(tensors[f"{cid}.vae_pixels"]).chunk(2, dim=1)
        z = tensors[f"{cid}.vae_latent"] / ae.params.scale_factor + ae.params.shift_factor
        eps = (z - mean) / torch.exp(0.5 * logvar)
        assert abs(float(eps.mean())) < 0.1 and 0.9 < float(eps.std()) < 1.1, (float(eps.mean()), float(eps.std()))
