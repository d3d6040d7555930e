"""Emu decoder layouts: the released unet / vae / safety checker built on meta from our presets match the
shapes files exactly; strict loading; check_decoder_layout; write_tiny_decoder round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling.emu import diffusion as D
from modeling.emu.decoder import (
    build_safety_checker,
    build_unet,
    build_vae,
    check_decoder_layout,
    load_decoder,
    release_names,
    write_tiny_decoder,
)
from modeling.emu.decoder_presets import RELEASED
from tests.conftest import shared_fixture

BUILD = {"unet": build_unet, "vae": build_vae, "safety_checker": build_safety_checker}
SECTIONS = [  # (shapes file, section, variant, kind)
    ("emu2-gen.shapes.json", "unet/diffusion_pytorch_model.bf16.safetensors", "emu2", "unet"),
    ("emu2-gen.shapes.json", "vae/diffusion_pytorch_model.bf16.safetensors", "emu2", "vae"),
    ("emu2-gen.shapes.json", "safety_checker/model.bf16.safetensors", "emu2", "safety_checker"),
    ("emu1.shapes.json", "unet/diffusion_pytorch_model.bin", "emu1", "unet"),  # the file's entry is inferred
    ("emu1.shapes.json", "vae/diffusion_pytorch_model.bin", "emu1", "vae"),
    # emu1.shapes.json has no safety checker: it is the same CompVis checker as Emu2-Gen's
    ("emu2-gen.shapes.json", "safety_checker/model.bf16.safetensors", "emu1", "safety_checker"),
]


@pytest.mark.parametrize("shapes_file,section,variant,kind", SECTIONS)
def test_released_layout(shapes_file, section, variant, kind):
    want = json.loads(shared_fixture(shapes_file).read_text())[section]
    module = BUILD[kind](RELEASED[variant][kind])
    got = {k: list(v.shape) for k, v in release_names(kind, module.state_dict()).items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert got == want


def test_released_sizes():
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert 2.5e9 < n(build_unet(RELEASED["emu2"]["unet"])) < 2.6e9
    assert 0.95e9 < n(build_unet(RELEASED["emu1"]["unet"])) < 0.99e9
    assert RELEASED["emu2"]["unet"]["projection_class_embeddings_input_dim"] == 3328


@pytest.mark.parametrize("name,variant", [("emu2-tiny", "emu2"), ("emu1-tiny", "emu1")])
def test_kits_pass_layout_check(name, variant):
    check_decoder_layout(shared_fixture(name), variant, safety_checker=True)


@pytest.fixture(scope="module", params=["emu2", "emu1"])
def tiny_dir(request, tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp(request.param), request.param, context_dim=16), request.param


def test_tiny_round_trip(tiny_dir):
    d, variant = tiny_dir
    ext = "bf16.safetensors" if variant == "emu2" else "bin"
    for f in ("unet/config.json", f"unet/diffusion_pytorch_model.{ext}", f"vae/diffusion_pytorch_model.{ext}",
              "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json",
              "safety_checker/config.json",
              "safety_checker/" + ("model.bf16.safetensors" if variant == "emu2" else "pytorch_model.bin")):
        assert (d / f).is_file(), f
    check_decoder_layout(d, variant, safety_checker=True)
    dec = load_decoder(d, variant, safety_checker=True)
    assert dec.context_dim == 16 and dec.unet.conv_in.weight.device.type == "cpu"
    lat = D.denoise(dec, torch.randn(1, 4, 16), torch.zeros(1, 4, 16), height=16, width=24, steps=1, guidance=2.0,
                    generators=[torch.Generator().manual_seed(0)])
    pixels, _ = D.decode(dec, lat)
    assert pixels.shape == (1, 16, 24, 3) and D.safety_check(dec, pixels) == [False]
    bf = load_decoder(d, variant, dtype=torch.bfloat16)
    assert bf.unet.conv_in.weight.dtype == torch.bfloat16 and bf.safety_checker is None
    lat16 = D.denoise(bf, torch.randn(2, 4, 16), torch.zeros(1, 4, 16), height=16, width=16, steps=2,
                      guidance=[2.0, 1.0], generators=[torch.Generator().manual_seed(i) for i in range(2)])
    assert lat16.dtype == torch.float32 and torch.isfinite(lat16).all()  # latents stay float32
    assert torch.isfinite(D.decode(bf, lat16)[1]).all()
    assert all(not p.is_meta for p in dec.safety_checker.parameters())
    assert all(not b.is_meta for b in dec.safety_checker.buffers())


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_unet(d, variant, edit):
    if variant == "emu2":
        p = d / "unet/diffusion_pytorch_model.bf16.safetensors"
        sd = load_file(str(p))
        edit(sd)
        save_file(sd, str(p))
    else:
        p = d / "unet/diffusion_pytorch_model.bin"
        sd = torch.load(p, weights_only=True)
        edit(sd)
        torch.save(sd, p)


def test_strict_loading(tiny_dir, tmp_path):
    src, variant = tiny_dir
    d = _copy(src, tmp_path / "missing")
    _edit_unet(d, variant, lambda sd: sd.pop("conv_in.bias"))
    with pytest.raises(ValueError, match=r"1 missing tensors \['conv_in.bias'\]"):
        load_decoder(d, variant)
    d = _copy(src, tmp_path / "extra")
    _edit_unet(d, variant, lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"1 unexpected \['extra.weight'\]"):
        load_decoder(d, variant)
    d = _copy(src, tmp_path / "shape")
    _edit_unet(d, variant, lambda sd: sd.__setitem__("conv_in.bias", torch.zeros(3)))
    with pytest.raises(ValueError, match="wrong shape, e.g. conv_in.bias"):
        load_decoder(d, variant)


def test_layout_errors(tiny_dir, tmp_path):
    src, variant = tiny_dir
    d = _copy(src, tmp_path / "a")
    (d / "vae/config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing vae/config.json"):
        check_decoder_layout(d, variant)
    d = _copy(src, tmp_path / "b")
    for f in (d / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="missing unet/diffusion_pytorch_model"):
        check_decoder_layout(d, variant)
    d = _copy(src, tmp_path / "c")
    (d / "scheduler/scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_decoder_layout(d, variant)
    cfg = json.loads((src / "scheduler/scheduler_config.json").read_text())
    (d / "scheduler/scheduler_config.json").write_text(json.dumps({**cfg, "timestep_spacing": "sideways"}))
    if variant == "emu2":  # PNDM has no timestep_spacing in its release config: break its betas instead
        with pytest.raises(ValueError, match="scheduler_config.json"):
            check_decoder_layout(d, variant)
    (d / "scheduler/scheduler_config.json").write_text(json.dumps({**cfg, "beta_schedule": "wobbly"}))
    with pytest.raises(ValueError, match="scheduler_config.json"):
        check_decoder_layout(d, variant)
    with pytest.raises(ValueError, match="_class_name|addition_embed_type"):
        check_decoder_layout(src, "emu1" if variant == "emu2" else "emu2")
    d = _copy(src, tmp_path / "e")
    (d / "safety_checker/config.json").unlink()
    check_decoder_layout(d, variant)  # only needed when the checker is asked for
    with pytest.raises(FileNotFoundError, match="missing safety_checker/config.json"):
        check_decoder_layout(d, variant, safety_checker=True)
    with pytest.raises(ValueError, match="variant"):
        check_decoder_layout(src, "emu3")
    with pytest.raises(ValueError, match="context_dim"):
        write_tiny_decoder(tmp_path / "z", variant, 0)
