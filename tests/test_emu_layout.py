"""The released Emu2-Gen and Emu1 multimodal-encoder module trees, built on the meta device,
match the released checkpoints' names and shapes exactly; the loaders are strict; check_layout
and the tiny writers produce / accept the released folder layouts."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling.emu.config import (
    PRESETS,
    emu1_params_from_configs,
    emu2_params_from_config,
)
from modeling.emu.layout import release_layout
from modeling.emu.load import check_layout, detect_variant, load_encoder, load_tokenizer
from modeling.emu.regress import encode_prompts
from modeling.emu.tiny import write_tiny
from tests.conftest import shared_fixture

EMU2_SHARDS = "multimodal_encoder/model.bf16-0000{1..8}-of-00008.safetensors"
EMU1_BIN = "multimodal_encoder/pytorch_model.bin"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _want(shapes_file: str, section: str) -> dict[str, tuple[int, ...]]:
    data = json.loads(shared_fixture(shapes_file).read_text())
    return {k: tuple(v) for k, v in data[section].items()}


@pytest.mark.parametrize("preset,shapes_file,section,n_tensors,n_values", [
    ("emu2-gen", "emu2-gen.shapes.json", EMU2_SHARDS, 1377, 36.91e9),
    ("emu1", "emu1.shapes.json", EMU1_BIN, 1096, 14.21e9),
])
def test_released_layout_matches_shapes_file(preset, shapes_file, section, n_tensors, n_values):
    want = _want(shapes_file, section)
    got = release_layout(PRESETS[preset])
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert got == want
    assert len(got) == n_tensors
    total = sum(torch.Size(s).numel() for s in got.values())
    assert abs(total - n_values) / n_values < 1e-3


def test_released_configs_give_the_presets():
    # Emu2-Gen multimodal_encoder/config.json (EmuForCausalLM form) at released values
    emu2 = {"hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60, "num_attention_heads": 52,
            "num_key_value_heads": 52, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
            "vocab_size": 32272, "hidden_act": "silu", "max_position_embeddings": 2048,
            "vision_config": {"image_size": 448, "patch_size": 14, "width": 1792, "layers": 64, "head_width": 112,
                              "mlp_ratio": 8.571428571428571, "postnorm": True, "qkv_bias": True, "n_query": 64}}
    assert emu2_params_from_config(emu2) == PRESETS["emu2-gen"]
    # Emu1: models/Emu-14B.json, models/llama_config/config.json, the hub's t5-base config
    emu = {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                             "mlp_ratio": 4.3637, "patch_size": 14},
           "multimodal_cfg": {"n_causal": 32}, "vladapter_cfg": {"name": "cformer", "n_causal": 32}}
    llama = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40,
             "rms_norm_eps": 1e-6, "vocab_size": 32000, "hidden_act": "silu"}
    t5 = {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12,
          "relative_attention_num_buckets": 32, "vocab_size": 32128, "feed_forward_proj": "relu",
          "layer_norm_epsilon": 1e-6}
    assert emu1_params_from_configs(emu, llama, t5) == PRESETS["emu1"]
    with pytest.raises(ValueError, match="rope"):
        emu2_params_from_config({**emu2, "vision_config": {**emu2["vision_config"], "rope": True}})


@pytest.mark.parametrize("name,variant", [("emu2-tiny", "emu2"), ("emu1-tiny", "emu1")])
def test_check_layout_accepts_kits(name, variant):
    assert check_layout(shared_fixture(name)) == variant


def test_detect_variant_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        detect_variant(tmp_path)


@pytest.mark.parametrize("name,missing", [
    ("emu1-tiny", "cformer_t5_config.json"), ("emu1-tiny", "llama_config/tokenizer.model"),
    ("emu2-tiny", "tokenizer/added_tokens.json"), ("emu2-tiny", "multimodal_encoder/model.bf16-00002-of-00002.safetensors"),
])
def test_check_layout_names_missing_files(tmp_path, name, missing):
    d = shutil.copytree(shared_fixture(name), tmp_path / name)
    (d / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.rsplit("/", 1)[-1]):
        check_layout(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu-tiny")
    return {v: write_tiny(root / v, v) for v in ("emu1", "emu2")}


@pytest.mark.parametrize("variant", ["emu1", "emu2"])
def test_tiny_is_a_loadable_released_layout(tiny, variant):
    d = tiny[variant]
    assert check_layout(d, safety_checker=True) == variant
    enc = load_encoder(d)
    tok = load_tokenizer(d)
    out = encode_prompts(enc, [tok.encode(["a red cube on a table"]), tok.encode([""])], [None, None]).embeds
    assert out.shape == (2, enc.n_embeds, enc.embed_dim) and torch.isfinite(out).all()
    if variant == "emu2":  # the two tokenizer files agree on text without special tokens
        fast = load_tokenizer(d, mode="fast")
        for text in ["a red cube on a table", "impressionist painting of an astronaut", "Zürich 42 !"]:
            assert fast.encode([text]).ids == tok.encode([text]).ids


def test_check_layout_wants_the_unet_context_to_be_the_embedding_width(tiny, tmp_path):
    d = shutil.copytree(tiny["emu2"], tmp_path / "m")
    cfg = json.loads((d / "unet" / "config.json").read_text())
    (d / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 64}))
    with pytest.raises(ValueError, match="cross_attention_dim 64"):
        check_layout(d)


def _emu1_bin(d):
    return d / "multimodal_encoder" / "pytorch_model.bin"


def test_emu1_loader_is_strict(tiny, tmp_path):
    src = tiny["emu1"]
    d = shutil.copytree(src, tmp_path / "m")
    sd = torch.load(_emu1_bin(src), weights_only=True)
    ref = load_encoder(src).stu_regress_head.weight
    torch.save({"module": sd}, _emu1_bin(d))  # the {"module": sd} form the reference accepts
    assert torch.equal(load_encoder(d).stu_regress_head.weight, ref)
    rounded = {k: v.bfloat16().float() if k.endswith("inv_freq") else v for k, v in sd.items()}
    torch.save(rounded, _emu1_bin(d))  # a checkpoint saved from a bf16-cast model: accepted, not used
    load_encoder(d)
    for bad, match in [({**sd, "decoder.lm.extra.weight": torch.zeros(1)}, "unexpected"),
                       ({k: v for k, v in sd.items() if k != "cformer.projection.bias"}, "missing"),
                       ({k: v for k, v in sd.items() if k != "visual.head.weight"}, "missing"),
                       ({**sd, "ln_visual.weight": torch.ones(3)}, "shape"),
                       ({k: v * 2 if k.endswith("layers.0.self_attn.rotary_emb.inv_freq") else v for k, v in sd.items()},
                        "rope_theta")]:
        torch.save(bad, _emu1_bin(d))
        with pytest.raises(ValueError, match=match):
            load_encoder(d)


def test_emu2_loader_fused_bias_and_optional_inv_freq(tiny, tmp_path, caplog):
    src = tiny["emu2"]
    d = shutil.copytree(src, tmp_path / "m")
    shard = d / "multimodal_encoder" / "model.bf16-00001-of-00002.safetensors"
    sd = load_file(str(shard))
    q, k, v = sd["model.visual.blocks.0.attn.qkv.bias"].chunk(3)
    enc = load_encoder(d)
    assert torch.equal(enc.visual.blocks[0].attn.q_bias, q) and torch.equal(enc.visual.blocks[0].attn.v_bias, v)
    sd["model.visual.blocks.0.attn.qkv.bias"] = torch.cat([q, torch.ones_like(k), v])
    save_file(sd, str(shard))
    with caplog.at_level(logging.WARNING, logger="modeling.emu.load"):
        load_encoder(d)
    assert "k third is not zero" in caplog.text
    # transformers > 4.31 saves no inv_freq: still a complete checkpoint
    llm_shard = d / "multimodal_encoder" / "model.bf16-00002-of-00002.safetensors"
    llm = {k: t for k, t in load_file(str(llm_shard)).items() if not k.endswith("inv_freq")}
    save_file(llm, str(llm_shard))
    for name in ("model.safetensors.index.json", "model.safetensors.index.bf16.json"):
        idx = json.loads((d / "multimodal_encoder" / name).read_text())
        idx["weight_map"] = {k: f for k, f in idx["weight_map"].items() if not k.endswith("inv_freq")}
        (d / "multimodal_encoder" / name).write_text(json.dumps(idx))
    load_encoder(d)
    del llm["model.decoder.lm.lm_head.weight"]
    save_file(llm, str(llm_shard))
    with pytest.raises(ValueError, match="index and the shards"):
        load_encoder(d)



@pytest.mark.parametrize("variant", ["emu1", "emu2"])
def test_tiny_generates_an_image(tiny, variant):
    """make-tiny output end to end: prompts -> regressed embeddings -> diffusion decoder -> pixels."""
    from PIL import Image

    from modeling.emu.diffusion import decode, denoise, load_decoder
    from modeling.emu.regress import unconditional
    from modeling.emu.transforms import EvaTransform

    d = tiny[variant]
    enc, tok, dec = load_encoder(d), load_tokenizer(d), load_decoder(d, variant)
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    pixels = EvaTransform(enc.params.eva.image_size).batch([img])
    cond = encode_prompts(enc, [tok.encode(["a red cube"]), tok.encode(["like ", img, " but blue"])],
                          [None, pixels]).embeds
    latents = denoise(dec, cond, unconditional(enc, tok), height=32, width=32, steps=2, guidance=3.0,
                      generators=[torch.Generator().manual_seed(i) for i in range(2)])
    out, _ = decode(dec, latents)
    assert out.shape == (2, 32, 32, 3) and out.dtype == torch.uint8
