"""The CLIP score stage: scores match torchmetrics' CLIPScore formula recomputed here on a tiny
random CLIP (`make-tiny clip`); a real toy job (local Ray) with `scores.clip` writes them to
images/, the webdataset JSON, the summary and the report; unscorable samples get null; a
missing or incomplete CLIP directory stops the job before Ray; changing the scorer is a
settings change."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.driver import prepare, run_job
from modeling.clip_score import ClipScorer, write_tiny_clip
from pipeline.family import ModelError, StageContext
from pipeline.report_data import gather
from pipeline.report_html import render
from pipeline.resume import ResumeError
from pipeline.rows import to_block
from pipeline.sample import Outputs, Sample
from pipeline.score_stats import describe, merge, stats_of
from pipeline.scoring import build_clip, check_clip_model
from pipeline.sink import SinkConfig, write_shard
from pipeline.spec import load_spec
from tests.conftest import ROOT, TOY, write_manifest

PROMPTS = ["a red cube on a table", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen, top view",
           "a watercolor fox", "a city street in the rain", "an astronaut riding a horse", "a close up of a flower"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> str:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def torchmetrics_clip_score(model_dir: str, images: list[np.ndarray], texts: list[str], model=None) -> list[float]:
    """torchmetrics' CLIPScore (functional/multimodal/clip_score.py) for each pair alone, re-derived
    here since torchmetrics is no dependency: the checkpoint's CLIPProcessor on a [C, H, W] uint8
    tensor, and on the caption with padding (ids cut to the text model's positions); the projected
    pooled features, l2-normalised; max(100 * their dot product, 0). The cosine in float64."""
    from transformers import CLIPModel, CLIPProcessor

    model = model or CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    positions = model.config.text_config.max_position_embeddings

    def features(out) -> np.ndarray:  # transformers >= 5 returns the model output, its pooler_output projected
        t = out if isinstance(out, torch.Tensor) else out.pooler_output
        v = t[0].double().numpy()
        return v / np.linalg.norm(v)

    scores = []
    with torch.no_grad():
        for img, text in zip(images, texts):
            pixels = processor(images=[torch.from_numpy(np.array(img)).permute(2, 0, 1)], return_tensors="pt", padding=True)["pixel_values"]
            tok = processor(text=[text], return_tensors="pt", padding=True)
            e_i = features(model.get_image_features(pixels))
            e_t = features(model.get_text_features(tok["input_ids"][..., :positions], tok["attention_mask"][..., :positions]))
            scores.append(max(100 * float(e_i @ e_t), 0.0))
    return scores


def test_scores_match_the_torchmetrics_formula(clip_dir):
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (24, 40), (64, 48), (7, 30), (3, 20), (33, 33), (40, 8), (128, 96)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    scorer = ClipScorer.load(clip_dir)
    got = scorer.score(images, PROMPTS)  # one batch: padded text, mixed image sizes
    assert got.dtype == np.float32 and got.shape == (8,)
    want = torchmetrics_clip_score(clip_dir, images, PROMPTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(got, 3))) == 8 and 5 < got.min() and got.max() < 95  # a spread, not clamped
    # the floor at 0: the same model with its text projection negated makes every cosine negative
    scorer.model.text_projection.weight.data.neg_()
    flipped = scorer.score(images, PROMPTS)
    assert (flipped == 0).all()
    assert torchmetrics_clip_score(clip_dir, images, PROMPTS, model=scorer.model) == [0.0] * 8
    print("clip scores", np.round(got, 3).tolist(), "max |diff|", float(np.abs(got - np.asarray(want)).max()))


def toy_spec(manifest: str, output: str, clip: str | None, *sets: str):
    overrides = {"family": TOY, "model": "toy", "manifest": manifest, "output": output}
    if clip is not None:
        overrides["scores.clip.model"] = clip
    return load_spec(None, overrides, ["stages.shade.device=cpu", "outputs.rows_per_shard=3", "outputs.webdataset=true",
                                       *(["scores.clip.num_gpus=0", "scores.clip.batch_size=4"] if clip else []), *sets])


def test_a_job_with_scores_clip_writes_the_column(ray_cluster, clip_dir, tmp_path, monkeypatch):
    rows = [{"id": f"r{i}", "prompt": p, "num_samples": 2 if i == 0 else 1} for i, p in enumerate(PROMPTS)]
    rows.append({"id": "bad", "prompt": "please reject me"})  # a stage's row error: no image, no score
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    states = []
    result = run_job(toy_spec(manifest, str(out), clip_dir), interactive=False, on_progress=states.append)
    assert result["status"] == "completed" and result["images"] == 9 and result["errors_by_kind"] == {"rejected": 1}
    assert "score" in result["stage_rows_per_second"]
    pairs = result["committed"]  # the live counts, against the commits: the score stage reports as the family's do
    assert {n: c.done for n, c in states[-1].stages.items()} == {"noise": pairs, "shade": pairs, "score": pairs}

    table = pq.read_table(out / "images")
    assert table.schema.field("clip_score").type == pa.float32()
    images = table.to_pylist()
    pixels = [np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")) for r in images]  # PNG: the pixels scored
    want = torchmetrics_clip_score(clip_dir, pixels, [r["prompt"] for r in images])
    got = [r["clip_score"] for r in images]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    meta = {}
    for tar in (out / "webdataset").glob("*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    j = json.loads(t.extractfile(m).read())
                    meta[(j["id"], j["sample_index"])] = j["clip_score"]
    assert meta == {(r["id"], r["sample_index"]): r["clip_score"] for r in images}

    stats = result["clip_score"]  # the summary: every committed image, from the commit stats
    assert stats["count"] == 9 and stats["min"] == round(min(got), 3) and stats["max"] == round(max(got), 3)
    assert stats["mean"] == pytest.approx(float(np.mean(got)), abs=1e-3)
    for q in ("p05", "p25", "p50", "p75", "p95"):  # quantiles to within one bin (1 point)
        assert abs(stats[q] - float(np.quantile(got, int(q[1:]) / 100))) <= 1.001, (q, stats[q])
    assert json.loads((out / "_summary.json").read_text())["clip_score"] == stats
    again = run_job(toy_spec(manifest, str(out), clip_dir), interactive=False)  # nothing to do: the stats come from the commits
    assert again["clip_score"] == stats

    html = render(gather(str(out)))
    assert 'id="clip-score"' in html and 'id="clip-score-stats"' in html and f"<td class=\"num\">{stats['mean']}</td>" in html
    assert "<td><code>score</code> (clip)</td><td>cpu</td><td>float32</td>" in html  # the stage's placement

    # the README's one-line filters
    import pyarrow.compute as pc

    threshold = float(np.median(got))
    good = pq.read_table(out / "images", filters=pc.field("clip_score") >= threshold)
    assert sorted(good["id"].to_pylist()) == sorted(r["id"] for r in images if r["clip_score"] >= threshold)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(out / "images" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf"))
    kept = ds.filter(lambda r: (r["clip_score"] or 0) >= threshold)
    assert sorted(kept["id"]) == sorted(good["id"].to_pylist())

    # another scorer is another job; a job without scores keeps its fingerprint
    other = write_tiny_clip(tmp_path / "clip-2", seed=1)
    with pytest.raises(ResumeError, match="scores"):
        prepare(toy_spec(manifest, str(out), other))
    assert "scores" not in prepare(toy_spec(manifest, str(tmp_path / "plain"), None)).fingerprint


def test_samples_without_prompt_or_image_get_null(clip_dir, tmp_path):
    rng = np.random.default_rng(1)
    pix = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)

    def sample(i, prompt, pixels):
        return Sample(id=f"s{i}", sample_index=0, task="t2i", prompt=prompt, outputs=Outputs(pixels=pixels))

    samples = [sample(0, "a red cube", pix), sample(1, None, pix), sample(2, "   ", pix), sample(3, "text only", None)]
    results = build_clip(StageContext(clip_dir, "cpu", "float32"))(samples)
    assert [r.scores for r in results][1:] == [None, None, None]
    assert results[0].scores["clip_score"] == pytest.approx(torchmetrics_clip_score(clip_dir, [pix], ["a red cube"])[0], rel=1e-5)
    for s, r in zip(samples, results):
        s.apply(r)
    for s in samples[:3]:  # what the encoder does: image bytes in place of the pixels
        buf = io.BytesIO()
        Image.fromarray(s.outputs.pixels).save(buf, "PNG")
        s.outputs.image, s.outputs.image_size, s.outputs.pixels = buf.getvalue(), (20, 20), None
    cfg = SinkConfig(output=str(tmp_path / "out"), family="toy", model="toy", webdataset=True, scores={"clip_score": "float32"})
    shard = write_shard(to_block(samples), cfg)
    assert shard.score_stats["clip_score"]["n"] == 1
    table = pq.read_table(tmp_path / "out" / "images")
    assert table.schema.field("clip_score").type == pa.float32()
    assert dict(zip(table["id"].to_pylist(), table["clip_score"].to_pylist())) == {
        "s0": results[0].scores["clip_score"], "s1": None, "s2": None}
    with tarfile.open(next((tmp_path / "out" / "webdataset").glob("*.tar"))) as t:
        metas = [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    assert sorted((m["id"], m["clip_score"]) for m in metas if m["clip_score"] is None) == [("s1", None), ("s2", None)]


def genfleet(*args):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_make_tiny_clip_and_a_bad_clip_path_fails_before_ray(tmp_path):
    made = genfleet("make-tiny", "clip", str(tmp_path / "clip"))
    assert made.returncode == 0 and "wrote a tiny" in made.stdout, made.stderr[-2000:]
    check_clip_model(str(tmp_path / "clip"))  # complete
    (tmp_path / "clip" / "preprocessor_config.json").unlink()
    manifest = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "prompt": ["p"]})
    for clip, end in ((tmp_path / "clip", "missing preprocessor_config.json"), (tmp_path / "nowhere", "not a directory")):
        p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"),
                     "--set", f"scores.clip.model={clip}")
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and last.startswith("genfleet: error: scores.clip.model") and end in last and str(clip) in last, p.stderr
        assert "Ray" not in p.stderr and not (tmp_path / "o").exists()  # before Ray, nothing written


def test_clip_directory_checks_name_the_file(clip_dir, tmp_path):
    import shutil

    def broken(name, change):
        d = tmp_path / name
        shutil.copytree(clip_dir, d)
        change(d)
        with pytest.raises(ModelError) as e:
            check_clip_model(str(d))
        return str(e.value)

    assert broken("bin", lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin")).endswith(
        "missing model.safetensors (pytorch_model.bin is not loaded: only safetensors are)")
    assert broken("vocab", lambda d: [(d / n).unlink() for n in ("tokenizer.json", "vocab.json")]).endswith("missing vocab.json (or tokenizer.json)")
    assert "model_type 'bagel'" in broken("type", lambda d: (d / "config.json").write_text('{"model_type": "bagel"}'))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert broken("shards", lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(index))).endswith(
        "missing model-00001-of-00002.safetensors (named by model.safetensors.index.json)")


def test_score_stats_merge_across_shards():
    rng = np.random.default_rng(2)
    values = np.clip(rng.normal(27, 6, 1000), 0, 100).tolist() + [0.0, 100.0]
    merged: dict = {}
    for lo in range(0, len(values), 97):  # shards of 97
        merge(merged, {"clip_score": stats_of("clip_score", values[lo:lo + 97])})
    d = describe(merged)["clip_score"]
    assert d["count"] == 1002 and d["min"] == 0.0 and d["max"] == 100.0 and d["mean"] == pytest.approx(np.mean(values), abs=1e-3)
    for q in (5, 25, 50, 75, 95):
        assert abs(d[f"p{q:02d}"] - np.quantile(values, q / 100)) <= 1.001
