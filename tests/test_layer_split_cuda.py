"""The layer split across a CUDA device and the CPU: real devices on both sides of the cut, so that
every tensor a layer reads (RoPE tables, the attention plan, routing indices, the KV cache and its
indices) must really be where the layer is. Needs CUDA (skipped without); torch and modeling only."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from modeling.bagel.load import SpecialTokens
from modeling.bagel.sampling import ImageParams, ImageRow, TextRow, denoise, generate_text, get_noise
from modeling.bagel.tiny import random_bagel, tiny_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPECIAL = SpecialTokens(bos_token_id=1, eos_token_id=2, start_of_image=3, end_of_image=4)


def _rows(model, device):
    g = torch.Generator(device=device).manual_seed(0)
    images = [ImageRow([10, 11, 12, 13], 32, 32, get_noise(model, 32, 32, g), ImageParams(num_timesteps=3)),
              ImageRow([20, 21], 16, 32, get_noise(model, 16, 32, g), ImageParams(num_timesteps=3, cfg_renorm_type="channel"))]
    texts = [TextRow([30, 31, 32], max_new_tokens=6), TextRow([40, 41, 42, 43, 44], max_new_tokens=4)]
    return images, texts


@torch.no_grad()
def test_split_across_cuda_and_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs on both sides of the cut
    base = random_bagel(dataclasses.replace(tiny_params(512), num_layers=5), seed=3).eval()
    one = copy.deepcopy(base).to("cuda")
    images, texts = _rows(one, "cuda")
    want_latents, want_tokens = denoise(one, images, SPECIAL), generate_text(one, texts, SPECIAL)

    # two handles of one GPU: the same kernels, so the same numbers as unsplit
    same = copy.deepcopy(base)
    same.split_layers(["cuda", "cuda"])
    for want, got in zip(want_latents, denoise(same, images, SPECIAL)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert generate_text(same, texts, SPECIAL) == want_tokens

    # GPU then CPU: each layer, and its keys and values, on its own device
    mixed = copy.deepcopy(base)
    split = mixed.split_layers(["cuda", "cpu"])
    moves = []
    split.register_handoff_hook(lambda layer, src, dst: moves.append((layer, src.type, dst.type)))
    layers = mixed.language_model.model.layers
    assert [next(layer.parameters()).device.type for layer in layers] == ["cuda"] * 3 + ["cpu"] * 2
    assert mixed.vae2llm.weight.device.type == "cuda" and mixed.language_model.lm_head.weight.device.type == "cuda"
    assert [k.device.type for k in mixed.new_cache([4, 4]).k] == ["cuda"] * 3 + ["cpu"] * 2
    got_latents = denoise(mixed, images, SPECIAL)
    assert moves and set(moves) == {(3, "cuda", "cpu"), (None, "cpu", "cuda")}
    for want, got in zip(want_latents, got_latents):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # CPU and GPU kernels round differently
    assert generate_text(mixed, texts, SPECIAL) == want_tokens
