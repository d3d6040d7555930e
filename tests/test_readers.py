"""The outputs open with pyarrow, ray.data.read_parquet, Hugging Face datasets and webdataset."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.driver import run_job
from pipeline.spec import load_spec
from tests.conftest import ROOT, TOY, write_manifest


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("readers")
    rows = [{"id": f"id.{i}/x", "prompt": f"p{i}", "num_samples": 2, "caption_source": f"src{i}"} for i in range(5)]
    rows[1]["prompt"] = ""
    manifest = write_manifest(str(d / "m.parquet"), rows)
    out = str(d / "out")
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": out},
                     ["stages.shade.device=cpu", "outputs.rows_per_shard=4", "outputs.webdataset=true"])
    return run_job(spec, interactive=False), out


def test_pyarrow_and_ray_data(finished):
    import pyarrow.dataset as pads
    import ray

    result, out = finished
    table = pads.dataset(f"{out}/images", format="parquet").to_table()
    assert table.num_rows == 8 and set(table["caption_source"].to_pylist()) == {"src0", "src2", "src3", "src4"}
    ds = ray.data.read_parquet(f"{out}/images")
    assert ds.count() == 8
    row = ds.filter(lambda r: r["id"] == "id.2/x" and r["sample_index"] == 1).take(1)[0]
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (row["width"], row["height"])
    emb = ray.data.read_parquet(f"{out}/embeddings").take_all()
    assert len(emb) == 8 and all(len(r["mean_color"]) == 3 for r in emb)
    assert ray.data.read_parquet(f"{out}/errors").take_all()[0]["kind"] == "empty_prompt"


def test_huggingface_datasets_parquet_builder(finished):
    import datasets

    _, out = finished
    ds = datasets.load_dataset("parquet", data_files={"train": f"{out}/images/*.parquet"}, split="train")
    assert len(ds) == 8 and set(ds.column_names) >= {"id", "sample_index", "image", "prompt", "seed", "sampler", "caption_source"}
    assert json.loads(ds[0]["sampler"]) == {"size": 16, "gain": 1.0}
    assert isinstance(ds.features["image"], datasets.Image) and ds[0]["image"].size == (16, 16)  # the schema's Image feature
    emb = datasets.load_dataset("parquet", data_files={"train": f"{out}/embeddings/*.parquet"}, split="train")
    assert emb.features["mean_color"].length == 3 and len(emb[0]["mean_color"]) == 3  # a fixed-size list


LOAD_OUTPUT = """
import json, sys
import datasets
from PIL import Image
out, cache = sys.argv[1], sys.argv[2]
images = datasets.load_dataset(out, "images", split="train", cache_dir=cache)
assert isinstance(images.features["image"], datasets.Image), images.features
row = images[0]
assert isinstance(row["image"], Image.Image) and row["image"].size == (row["width"], row["height"])
default = datasets.load_dataset(out, split="train", cache_dir=cache)  # the card's default config: images
emb = datasets.load_dataset(out, "embeddings", split="train", cache_dir=cache)
err = datasets.load_dataset(out, "errors", split="train", cache_dir=cache)
print(json.dumps({"images": len(images), "default": len(default), "embeddings": len(emb), "columns": emb.column_names,
                  "errors": [r["kind"] for r in err], "ids": sorted({r["id"] for r in images})}))
"""


def test_huggingface_load_dataset_of_the_output_dir(finished, tmp_path):
    """`load_dataset(OUTPUT, "images")` through the dataset card, offline, in a fresh interpreter."""
    _, out = finished
    card = (Path(out) / "README.md").read_text()
    assert card.startswith("---\nconfigs:\n") and "config_name: images" in card and "data_files: errors/*.parquet" in card
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", LOAD_OUTPUT, out, str(tmp_path / "cache")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["images"] == got["default"] == got["embeddings"] == 8 and got["errors"] == ["empty_prompt"]
    assert "mean_color" in got["columns"] and got["ids"] == ["id.0/x", "id.2/x", "id.3/x", "id.4/x"]


def test_webdataset_shards(finished):
    import webdataset as wds

    _, out = finished
    tars = sorted(str(p) for p in Path(out, "webdataset").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == 8
    s = samples[0]
    meta = s["json"]
    assert s["png"].size == (16, 16) and meta["prompt"].startswith("p") and "caption_source" in meta
    assert np.asarray(s["npy"]).shape == (3,)


def test_status_command(finished):
    result, out = finished
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "status", out, "--json"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["state"] == "completed" and st["expected"] == st["committed"] == 10 and st["images"] == 8 and st["errors"] == 1
    assert st["errors_by_kind"] == {"empty_prompt": 1}


def test_errors_command(finished):
    _, out = finished
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "errors", out], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"genfleet errors of {out}: 1 permanent error(s)", "  empty_prompt: 1",
                                        "    id.1/x [-1] validate: prompt is empty"], proc.stdout


def test_an_output_with_binary_images_is_not_resumed_into(tmp_path):
    """An output of a version that wrote `image` as plain bytes: resuming it would mix column types."""
    from pipeline.resume import ResumeError, check_output

    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": "m", "output": str(tmp_path)})
    new = spec.output_fingerprint("toy-v1", {})
    old = {k: v for k, v in new.items() if k != "image_column"}
    (tmp_path / "_job.json").write_text(json.dumps({"fingerprint": old, "expected_pairs": 1, "runs": []}))
    with pytest.raises(ResumeError, match="image_column: None -> 'hf_image'"):
        check_output(str(tmp_path), new, new_run=False)
