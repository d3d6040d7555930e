"""Tiny stack writer -> dalle2-laion config -> family stages: t2i, variation and edit round trips."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.families import get_family
from pipeline.family import RowError, StageContext
from modeling.dalle2.tiny import CONFIG_NAME, write_tiny

FAMILY = get_family("dalle2")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    path = str(write_tiny(tmp_path_factory.mktemp("dalle2"), seed=0))
    fns = [(s.name, s.build(StageContext(path, "cpu", "float32"))) for s in FAMILY.stages(path)]
    return path, fns


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


IMAGE = (np.random.RandomState(0).rand(40, 48, 3) * 255).astype(np.uint8)
MASK = np.zeros((40, 48), np.uint8)
MASK[:, 24:] = 255  # repaint the right half (after the centre crop: columns 20.. of 40)


def _row(task, seed, prompt="a red chair", params=None, **kw):
    return dict(id=f"{task}-{seed}", sample_index=0, task=task, prompt=prompt, negative_prompt=None, seed=0,
                sample_seed=seed, width=None, height=None, image=kw.get("image"), mask=kw.get("mask"),
                params=FAMILY.params_for(task, params or {}))


def _run(fns, rows):
    rows = [dict(r) for r in rows]
    for _, fn in fns:
        outs = fn(rows)
        assert len(outs) == len(rows)
        for r, o in zip(rows, outs):
            r.update(o)
    return rows


def test_stages_follow_the_config(stack):
    path, fns = stack
    assert [n for n, _ in fns] == ["prepare", "prior", "decoder", "upsampler2"]
    assert FAMILY.tasks == {"t2i", "variation", "edit"}
    assert FAMILY.model_name(path) == "dalle2:" + CONFIG_NAME.rsplit(".", 1)[0]


def test_round_trip_and_batch_independence(stack):
    _, fns = stack
    fast = {"prior_steps": 4, "decoder_steps": [4, 3]}
    rows = [_row("t2i", 1, params=fast), _row("t2i", 2, "a lighthouse at dusk", {**fast, "prior_cond_scale": 2.0}),
            _row("variation", 3, image=_png(IMAGE), params={"decoder_steps": 3}),
            _row("edit", 4, image=_png(IMAGE), mask=_png(MASK), params={**fast, "inpaint_resample_times": 2})]
    out = _run(fns, rows)
    for r in out:
        assert r["pixels"].shape == (32, 32, 3) and r["pixels"].dtype == np.uint8
        assert set(r["embeddings"]) == {"text_embed", "image_embed"}
        for v in r["embeddings"].values():
            assert v.shape == (32,) and v.dtype == np.float32 and np.isfinite(v).all()
        assert abs(np.linalg.norm(r["embeddings"]["text_embed"]) - 1) < 1e-4
        assert all(r[k] is None for k in r if k.startswith("dalle2_"))
    assert out[0]["pixels"].std() > 0
    # edit keeps the unpainted half of the (centre-cropped, resized) input
    kept = np.asarray(Image.fromarray(IMAGE).crop((4, 0, 44, 40)).resize((32, 32), Image.BICUBIC)).astype(int)
    diff = np.abs(out[3]["pixels"].astype(int) - kept)[:, :15]
    assert diff.max() <= 1
    # one by one gives the same outputs as the mixed batch; a new seed gives other ones
    assert abs(np.linalg.norm(out[2]["embeddings"]["image_embed"]) - 1) < 1e-4  # CLIP image embedding
    for r, o in [(rows[1], out[1]), (rows[3], out[3])]:
        alone = _run(fns, [r])[0]
        assert np.abs(alone["pixels"].astype(int) - o["pixels"].astype(int)).max() <= 1
        np.testing.assert_allclose(alone["embeddings"]["image_embed"], o["embeddings"]["image_embed"], atol=1e-5)
    other = _run(fns, [_row("t2i", 99, params=fast)])[0]
    assert np.abs(other["pixels"].astype(int) - out[0]["pixels"].astype(int)).max() > 10


def test_params_validation(stack):
    _, fns = stack
    assert FAMILY.params_for("variation", {})["decoder_eta"] == 0.0
    for task, over, msg in [("t2i", {"cfg": 1}, "unknown"), ("t2i", {"prior_steps": 0}, r"\[1, 10000\]"),
                            ("variation", {"prior_steps": 4}, "unknown"), ("edit", {"decoder_cond_scale": "x"}, "number"),
                            ("understand", {}, "serves")]:
        with pytest.raises(RowError, match=msg) as e:
            FAMILY.params_for(task, over)
        assert e.value.kind == "bad_params"
    with pytest.raises(RowError, match="3 entries"):
        _run(fns, [_row("t2i", 1, params={"decoder_steps": [2, 2, 2]})])
    with pytest.raises(RowError) as e:
        _run(fns, [_row("variation", 1)])
    assert e.value.kind == "missing_input"
    with pytest.raises(RowError, match="makes 32x32"):
        _run(fns, [{**_row("t2i", 1), "width": 64}])
    with pytest.raises(RowError, match="negative_prompt"):
        _run(fns, [{**_row("t2i", 1), "negative_prompt": "blurry"}])


def test_fingerprint_tracks_configs(stack, tmp_path):
    path, _ = stack
    fp = FAMILY.model_fingerprint(path)
    cfg = json.loads(open(path).read())
    cfg["prior"]["default_cond_scale"] = 3.0
    other = tmp_path / "m.json"
    other.write_text(json.dumps(cfg))
    assert FAMILY.model_fingerprint(path) == fp and FAMILY.model_fingerprint(str(other)) != fp
