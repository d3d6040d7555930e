"""DALLE2 through `genfleet run` on CPU: a dalle2-laion config of a tiny stack,
t2i, variation and inpainting rows, each stage on its own (declared) GPU actor."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from modeling.dalle2.tiny import write_tiny
from pipeline.spec import load_spec
from tests.conftest import write_manifest


def png(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory):
    return str(write_tiny(tmp_path_factory.mktemp("dalle2")))


def test_t2i_variation_inpaint_through_the_runner(ray_cluster, tiny_stack, tmp_path):
    rng = np.random.default_rng(0)
    source = png(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    mask = np.zeros((48, 40), np.uint8)  # the input image's size
    mask[12:36, 10:30] = 255
    rows = [
        {"id": "t2i", "task": "t2i", "prompt": "a red cube", "num_samples": 2, "image": None, "mask": None},
        {"id": "var", "task": "variation", "prompt": None, "num_samples": 1, "image": source, "mask": None},
        {"id": "inpaint", "task": "edit", "prompt": "a green square", "num_samples": 1, "image": source, "mask": png(mask, "L")},
        {"id": "understand", "task": "understand", "prompt": "what?", "num_samples": 1, "image": source, "mask": None},
    ]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    sets = ["stages.prior.device=cpu", "stages.decoder.device=cpu", "stages.upsampler2.device=cpu",
            "sampler.t2i.prior_steps=4", "sampler.t2i.decoder_steps=4", "sampler.variation.decoder_steps=4",
            "sampler.edit.prior_steps=4", "sampler.edit.decoder_steps=4", "sampler.edit.inpaint_resample_times=2"]
    spec = load_spec(None, {"family": "dalle2", "model": tiny_stack, "manifest": manifest, "output": str(tmp_path / "out")}, sets)
    result = run_job(spec, interactive=False)

    assert result["status"] == "completed" and result["images"] == 4 and result["errors"] == 1, result
    assert set(result["stage_rows_per_second"]) == {"prepare", "prior", "decoder", "upsampler2"}
    images = pq.read_table(tmp_path / "out" / "images").to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in images) == [("inpaint", 0), ("t2i", 0), ("t2i", 1), ("var", 0)]
    for r in images:
        img = np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])))
        assert img.shape == (32, 32, 3) and img.std() > 0
    by_id = {(r["id"], r["sample_index"]): r["image"]["bytes"] for r in images}
    assert by_id[("t2i", 0)] != by_id[("t2i", 1)]
    # the sampler settings recorded are those used: unset scales from the model config (tiny: prior 1.5, unets 1.7 and 1.0)
    sampler = {r["id"]: json.loads(r["sampler"]) for r in images}
    assert {k: sampler["t2i"][k] for k in ("prior_steps", "prior_cond_scale", "decoder_steps", "decoder_cond_scale")} == \
        {"prior_steps": 4, "prior_cond_scale": 1.5, "decoder_steps": [4, 4], "decoder_cond_scale": [1.7, 1.0]}
    assert sampler["var"]["decoder_cond_scale"] == [1.7, 1.0] and "prior_cond_scale" not in sampler["var"]
    emb = pq.read_table(tmp_path / "out" / "embeddings").to_pylist()
    t2i_emb = [e for e in emb if e["id"] == "t2i"][0]
    assert len(t2i_emb["text_embed"]) == len(t2i_emb["image_embed"]) > 0
    err = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert [(e["id"], e["kind"]) for e in err] == [("understand", "unsupported_task")]

    # the same rows in other batch sizes: the same noise, so the same images up to float
    # rounding (CPU GEMMs sum in another order when the batch shape changes: at most 1 level)
    spec2 = load_spec(None, {"family": "dalle2", "model": tiny_stack, "manifest": manifest, "output": str(tmp_path / "out2")},
                      sets + ["stages.decoder.batch_size=1", "stages.prior.batch_size=3"])
    run_job(spec2, interactive=False)
    again = {(r["id"], r["sample_index"]): r["image"]["bytes"] for r in pq.read_table(tmp_path / "out2" / "images").to_pylist()}
    assert again.keys() == by_id.keys()
    for key, data in again.items():
        a, b = (np.asarray(Image.open(io.BytesIO(x))).astype(int) for x in (data, by_id[key]))
        assert np.abs(a - b).max() <= 1, key
