"""Tiny stack writer -> dalle2-laion config -> family stages: t2i, variation and edit round trips."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from modeling.dalle2.tiny import CONFIG_NAME, write_tiny
from pipeline.families.dalle2 import FAMILY, EditParams, T2IParams, VariationParams
from pipeline.family import ModelError, parse_params
from pipeline.sample import RowError
from tests.family_harness import Stages, make_sample


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = str(write_tiny(tmp_path_factory.mktemp("dalle2"), seed=0))
    return path, Stages("dalle2", path)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


IMAGE = (np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)
MASK = np.zeros((40, 48), np.uint8)
MASK[:, 24:] = 255  # repaint the right half (after the centre crop: columns 20.. of 40)


def _row(task, seed, prompt="a red chair", params=None, **inputs):
    return make_sample("dalle2", task, sample_seed=seed, params=params, inputs=inputs, prompt=prompt)


def test_stages_follow_the_config(stack):
    path, stages = stack
    assert [r.name for r in stages.runners] == ["prepare", "prior", "decoder", "upsampler2"]
    assert set(FAMILY.tasks) == {"t2i", "variation", "edit"}
    assert FAMILY.model_name(path) == "dalle2:" + CONFIG_NAME.rsplit(".", 1)[0]


def test_round_trip_and_batch_independence(stack):
    _, stages = stack
    fast = {"prior_steps": 4, "decoder_steps": [4, 3]}
    rows = [_row("t2i", 1, params=fast), _row("t2i", 2, "a lighthouse at dusk", {**fast, "prior_cond_scale": 2.0}),
            _row("variation", 3, params={"decoder_steps": 3}, image=_png(IMAGE)),
            _row("edit", 4, params={**fast, "inpaint_resample_times": 2}, image=_png(IMAGE), mask=_png(MASK))]
    out = stages(rows)
    for s in out:
        assert s.failure is None, s.failure
        o = s.outputs
        assert o.pixels.shape == (32, 32, 3) and o.pixels.dtype == np.uint8
        assert set(o.embeddings) == {"text_embed", "image_embed"}
        for v in o.embeddings.values():
            assert v.shape == (32,) and v.dtype == np.float32 and np.isfinite(v).all()
        assert abs(np.linalg.norm(o.embeddings["text_embed"]) - 1) < 1e-4
        assert s.state is None
    assert out[0].outputs.pixels.std() > 0
    # edit keeps the unpainted half of the (centre-cropped, resized) input
    kept = np.asarray(Image.fromarray(IMAGE).crop((4, 0, 44, 40)).resize((32, 32), Image.BICUBIC)).astype(int)
    assert np.abs(out[3].outputs.pixels.astype(int) - kept)[:, :15].max() <= 1
    # one by one gives the same outputs as the mixed batch; a new seed gives other ones
    assert abs(np.linalg.norm(out[2].outputs.embeddings["image_embed"]) - 1) < 1e-4  # CLIP image embedding
    for r, o in [(rows[1], out[1]), (rows[3], out[3])]:
        alone = stages([r])[0].outputs
        assert np.abs(alone.pixels.astype(int) - o.outputs.pixels.astype(int)).max() <= 1
        np.testing.assert_allclose(alone.embeddings["image_embed"], o.outputs.embeddings["image_embed"], atol=1e-5)
    other = stages([_row("t2i", 99, params=fast)])[0].outputs
    assert np.abs(other.pixels.astype(int) - out[0].outputs.pixels.astype(int)).max() > 10


def test_params_and_row_errors(stack):
    _, stages = stack
    assert VariationParams().decoder_eta == 0.0 and EditParams().inpaint_resample_times == 5
    for model, over, field in [(T2IParams, {"cfg": 1}, "params.cfg"), (T2IParams, {"prior_steps": 0}, "params.prior_steps"),
                               (VariationParams, {"prior_steps": 4}, "params.prior_steps"),
                               (EditParams, {"decoder_cond_scale": "x"}, "params.decoder_cond_scale")]:
        with pytest.raises(RowError, match=field) as e:
            parse_params(model, over)
        assert e.value.kind == "bad_params"
    small = _png(MASK[:20, :20])
    out = stages([_row("t2i", 1, params={"decoder_steps": [2, 2, 2]}), _row("variation", 1),
                  make_sample("dalle2", "t2i", sample_seed=1, width=64), make_sample("dalle2", "t2i", sample_seed=1, negative_prompt="blurry"),
                  _row("edit", 5, image=_png(IMAGE), mask=small), _row("t2i", 6, params={"prior_steps": 2, "decoder_steps": 2})])
    msgs = [(s.failure.kind, s.failure.message) if s.failure else None for s in out]
    assert "3 entries" in msgs[0][1] and msgs[1][0] == "missing_input" and "makes 32x32" in msgs[2][1]
    assert "negative_prompt" in msgs[3][1]
    assert msgs[4][0] == "bad_mask" and "20x20" in msgs[4][1]  # a mask of another size is refused, not stretched
    assert msgs[5] is None  # the good sample of the batch still lands


def test_model_checks(stack, tmp_path):
    path, _ = stack
    FAMILY.check_model(path)
    with pytest.raises(ModelError, match="is a directory; give its dalle2-laion config JSON"):
        FAMILY.check_model(str(tmp_path))
    cfg = json.loads(open(path).read())
    cfg["prior"]["load_model_from"]["path"] = "gone.pth"
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="missing gone.pth"):
        FAMILY.check_model(str(tmp_path / "m.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        FAMILY.check_model(str(tmp_path / "bad.json"))


def test_fingerprint_tracks_configs(stack, tmp_path):
    path, _ = stack
    fp = FAMILY.model_fingerprint(path)
    cfg = json.loads(open(path).read())
    cfg["prior"]["default_cond_scale"] = 3.0
    other = tmp_path / "m.json"
    other.write_text(json.dumps(cfg))
    assert FAMILY.model_fingerprint(path) == fp and FAMILY.model_fingerprint(str(other)) != fp


def test_a_prompt_cannot_end_itself_with_clips_special_tokens(stack):
    from modeling.dalle2.load import Stack

    clip = Stack.from_json(stack[0]).clip()
    plain, injected = clip.tokenize(["a red chair"])[0], clip.tokenize(["a red <|endoftext|> chair"])[0]
    eot = clip.eot_id
    assert (plain == eot).nonzero()[0].item() < (injected == eot).nonzero()[0].item()  # EOT only at the true end
    assert (injected[: (injected == eot).nonzero()[0].item()] != eot).all()
