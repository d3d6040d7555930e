"""The Emu families' stages over samples, without Ray (tests/family_harness.py), on the tiny
random models of both variants: t2i and compose, batching, the cached guidance branch, row
errors, special-token injection, model checks, parameter validation, registration."""

import io
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.emu import regress as R
from modeling.emu.load import load_tokenizer
from modeling.emu.tiny import write_tiny
from pipeline.families import get_family
from pipeline.families.emu_params import Emu1Sampler, Emu2Sampler
from pipeline.family import ModelError, parse_params
from pipeline.sample import RowError
from tests.conftest import ROOT
from tests.family_harness import Stages, make_sample

FAMILIES = {"emu2": "pipeline.families.emu:EMU2", "emu1": "pipeline.families.emu:EMU1"}
FAST = {"num_inference_steps": 2, "default_size": [64, 64]}
N_EMBEDS = {"emu2": (64, 32), "emu1": (32, 64)}  # the tiny models' [n, d]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only contend on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["emu2", "emu1"])
def tiny(request, tmp_path_factory):
    variant = request.param
    model = str(write_tiny(tmp_path_factory.mktemp(variant), variant))
    return variant, model, Stages(FAMILIES[variant], model)


def png(seed: int, w: int = 40, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def row(variant, task="t2i", seed=1, prompt="a red cube on a table", params=None, images=None, **fields):
    return make_sample(FAMILIES[variant], task, sample_seed=seed, params={**FAST, **(params or {})},
                       inputs={"images": images} if images else None, prompt=prompt, row_id=f"{task}-{seed}", **fields)


def mixed_rows(variant):
    rows = [row(variant, seed=1), row(variant, seed=2, prompt="a lighthouse at dusk", params={"guidance_scale": 1.0}),
            row(variant, seed=3, params={"num_inference_steps": 3, "guidance_scale": 5.0}),
            row(variant, "compose", 4, "a photo of <image> next to <image>, watercolor", images=[png(0), png(1, 64, 32)]),
            row(variant, "compose", 5, "in the style of this painting", images=[png(2)]),
            row(variant, "compose", 6, "", images=[png(3)]),  # Emu2: autoencoding; Emu1: in-context with one image
            row(variant, "compose", 7, "<image> and <image>", images=[png(4)])]  # one image short
    return rows


def test_t2i_and_compose_batched_equals_alone(tiny):
    variant, _, stages = tiny
    rows = mixed_rows(variant)
    out = stages(rows)
    *good, bad = out
    assert bad.failure is not None and (bad.failure.stage, bad.failure.kind) == ("prepare", "bad_prompt")
    assert "2 <image> placeholder(s) for 1 image(s)" in bad.failure.message
    for s in good:
        assert s.failure is None, s.failure
        assert s.outputs.pixels.shape == (64, 64, 3) and s.outputs.pixels.dtype == np.uint8 and s.outputs.pixels.std() > 0
        emb = s.outputs.embeddings["emu_visual"]
        assert emb.shape == N_EMBEDS[variant] and emb.dtype == np.float32 and np.isfinite(emb).all()
        assert s.outputs.scores == {} and s.state is None
    embs = [s.outputs.embeddings["emu_visual"] for s in good]
    assert np.array_equal(embs[0], embs[2])  # same prompt, the LLM is deterministic ...
    assert np.abs(good[0].outputs.pixels.astype(int) - good[2].outputs.pixels.astype(int)).max() > 10  # ... the noise is not
    assert all(not np.allclose(embs[0], e) for e in embs[3:])  # the images condition the embeddings
    for r, batched in zip(rows, good):
        alone = stages([r])[0].outputs
        a, b = alone.embeddings["emu_visual"], batched.outputs.embeddings["emu_visual"]
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a), r.id
        assert np.abs(alone.pixels.astype(int) - batched.outputs.pixels.astype(int)).max() <= 1, r.id


def test_samples_of_a_row_share_its_embeddings_not_its_noise(tiny):
    variant, _, stages = tiny
    a, b = row(variant, seed=11), row(variant, seed=12)
    b.id, b.sample_index = a.id, 1
    out = stages([a, b])
    assert np.array_equal(out[0].outputs.embeddings["emu_visual"], out[1].outputs.embeddings["emu_visual"])
    assert not np.array_equal(out[0].outputs.pixels, out[1].outputs.pixels)


def test_guidance_branch_is_computed_once_per_actor(tiny, monkeypatch):
    variant, model, _ = tiny
    calls = {"text": 0, "image": 0}
    for name, kind in (("unconditional", "text"), ("autoencode_uncond", "image")):
        real = getattr(R, name)

        def counted(*args, _real=real, _kind=kind):
            calls[_kind] += 1
            return _real(*args)

        monkeypatch.setattr(R, name, counted)
    stages = Stages(FAMILIES[variant], model)  # a fresh actor
    batch = [row(variant, seed=21), row(variant, "compose", 22, "", images=[png(5)])]
    for _ in range(2):
        assert all(s.failure is None for s in stages(batch))
    assert calls == {"text": 1, "image": 1 if variant == "emu2" else 0}
    calls.update(text=0, image=0)
    assert Stages(FAMILIES[variant], model)([row(variant, seed=23, params={"guidance_scale": 1.0})])[0].failure is None
    assert calls["text"] == 0  # unguided rows never need it


@pytest.mark.parametrize("literal", ["[IMG]", "[/IMG]", "<s>", "[PAD]", "[<IMG_PLH>]"])
def test_user_text_cannot_inject_special_tokens(tiny, literal):
    variant, model, stages = tiny
    prep = stages.runners[0]
    t2i, comp = row(variant, prompt=f"a dog {literal} <image> on a table"), row(variant, "compose", 2, f"{literal} x <image>", images=[png(0)])
    prep.run([t2i, comp])
    special = load_tokenizer(model, variant).special
    specials = {special.boi, special.eoi, special.image, special.pad, special.bos}
    p = t2i.state.prompt
    assert p.n_images == 0 and p.image_positions == [] and p.ids[0] == special.bos and p.ids[-1] == special.boi
    assert not specials & set(p.ids[1:-1])  # in t2i even "<image>" is text
    q = comp.state.prompt
    n = N_EMBEDS[variant][0]
    assert q.n_images == 1 and len(q.image_positions) == n and q.ids.count(special.image) == n
    assert q.ids.count(special.boi) == 2 and q.ids.count(special.eoi) == 1  # the image's block + the generating [IMG]


def test_row_errors_leave_the_batch(tiny):
    variant, _, stages = tiny
    out = stages([row(variant, negative_prompt="blurry"), row(variant, width=100), row(variant, seed=3, height=128),
                  row(variant, "compose", 4, "<image>", images=[b"not an image"]),
                  row(variant, "compose", 5, "x " * 1500, images=[png(0)] * 30), row(variant, seed=6, prompt="x " * 1500)])
    errors = [(s.failure.kind, s.failure.message) if s.failure else None for s in out]
    assert errors[0][0] == "bad_params" and "negative prompt" in errors[0][1]
    assert errors[1] == ("bad_params", "width must be a multiple of 64 in [64, 2048], got 100")
    assert errors[2] is None and out[2].outputs.pixels.shape == (128, 64, 3)
    assert errors[3][0] == "bad_image"
    assert errors[4][0] == errors[5][0] == "prompt_too_long" and "2048 positions" in errors[4][1]


def test_safety_checker_flags_without_blacking_out(tiny):
    variant, model, plain = tiny
    stages = Stages(FAMILIES[variant], model, {"safety_checker": True})
    flagged, unflagged = stages([row(variant, seed=31)])[0], plain([row(variant, seed=31)])[0]
    assert flagged.outputs.scores == {"nsfw": False}  # the tiny checker's thresholds are above 1: never fires
    assert np.array_equal(flagged.outputs.pixels, unflagged.outputs.pixels)


def test_params_validation_names_the_field():
    assert (Emu2Sampler().guidance_scale, Emu2Sampler().default_size, Emu2Sampler().num_inference_steps) == (3.0, (1024, 1024), 50)
    assert (Emu1Sampler().guidance_scale, Emu1Sampler().default_size) == (7.5, (512, 512))
    assert parse_params(Emu2Sampler, {"guidance_scale": 2, "default_size": [128, 64]}).default_size == (128, 64)
    for model, values, field in [(Emu2Sampler, {"guidance_scale": "3"}, "params.guidance_scale"),
                                 (Emu2Sampler, {"num_inference_steps": 0}, "params.num_inference_steps"),
                                 (Emu2Sampler, {"default_size": [100, 64]}, "params.default_size.0"),
                                 (Emu1Sampler, {"original_size": [1024, 1024]}, "params.original_size"),
                                 (Emu2Sampler, {"steps": 4}, "params.steps")]:
        with pytest.raises(RowError, match=field) as e:
            parse_params(model, values)
        assert e.value.kind == "bad_params"


def test_check_model_names_the_missing_file(tiny, tmp_path):
    variant, model, _ = tiny
    family = get_family(FAMILIES[variant])
    family.check_model(model)
    other = get_family(FAMILIES["emu1" if variant == "emu2" else "emu2"])
    with pytest.raises(ModelError, match=f"run it with family {variant}"):
        other.check_model(model)
    with pytest.raises(ModelError, match="not a directory"):
        family.check_model(str(tmp_path / "nowhere"))
    broken = shutil.copytree(model, tmp_path / "broken")
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"missing unet/config.json") as e:
        family.check_model(str(broken))
    assert "\n" not in str(e.value)
    shutil.rmtree(broken / "unet")
    shutil.copytree(f"{model}/unet", broken / "unet")
    cfg = broken / ("multimodal_encoder/config.json" if variant == "emu2" else "Emu-14B.json")
    fp = family.model_fingerprint(str(broken))
    cfg.write_text(cfg.read_text().replace("{", '{"note": 1, ', 1))
    assert family.model_fingerprint(str(broken)) != fp
    family.check_model(str(broken))
    (broken / "tokenizer" if variant == "emu2" else broken / "llama_config").joinpath("tokenizer.model").unlink()
    with pytest.raises(ModelError, match="missing tokenizer.model"):
        family.check_model(str(broken))
    assert family.model_name(model) == f"{variant}:{Path(model).name}"


def test_entry_points_name_the_families():
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["genfleet.families"]
    assert {k: v for k, v in eps.items() if k.startswith("emu")} == {"emu1": FAMILIES["emu1"], "emu2": FAMILIES["emu2"]}
    for name, target in FAMILIES.items():
        family = get_family(target)
        assert family.name == name and set(family.tasks) == {"t2i", "compose"} and family.scores == {"nsfw": "bool"}
        assert [s.name for s in family.stages("unused")] == ["prepare", "lmm", "unet", "vae_decode"]


@pytest.mark.parametrize("variant", ["emu2", "emu1"])
def test_example_config_fits_the_family(variant):
    from pipeline.spec import load_spec

    spec = load_spec(str(ROOT / "configs" / f"{variant}-t2i.yaml"))
    family = get_family(FAMILIES[spec.family])
    assert set(spec.stages) <= {s.name for s in family.stages(spec.model)}
    for task, values in spec.sampler.items():
        parse_params(family.tasks[task].params, values)
