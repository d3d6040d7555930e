"""The outputs open with pyarrow, ray.data.read_parquet, Hugging Face datasets and webdataset."""

import io
import json
import subprocess
import sys

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
    assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])
    emb = ray.data.read_parquet(f"{out}/embeddings").take_all()
    assert len(emb) == 8 and all(len(r["mean_color"]) == 3 for r in emb)
    assert ray.data.read_parquet(f"{out}/errors").take_all()[0]["kind"] == "empty_prompt"


def test_huggingface_datasets_parquet_builder(finished):
    import datasets

    _, out = finished
    ds = datasets.load_dataset("parquet", data_files={"train": f"{out}/images/*.parquet"}, split="train")
    assert len(ds) == 8 and set(ds.column_names) >= {"id", "sample_index", "image", "prompt", "seed", "sampler", "caption_source"}
    assert json.loads(ds[0]["sampler"]) == {"size": 16, "gain": 1.0}
    emb = datasets.load_dataset("parquet", data_files={"train": f"{out}/embeddings/*.parquet"}, split="train")
    assert emb.features["mean_color"].length == 3 and len(emb[0]["mean_color"]) == 3  # a fixed-size list


def test_webdataset_shards(finished):
    import webdataset as wds

    _, out = finished
    from pathlib import Path

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
