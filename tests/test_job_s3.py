"""End to end on a real local Ray with fake GPUs, from an S3 manifest to S3 outputs."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from pipeline.spec import load_spec
from pipeline.storage import filesystem
from tests.conftest import TOY, write_manifest


def png(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, color).save(buf, "PNG")
    return buf.getvalue()


def manifest_rows():
    rows = [{"id": f"r{i:02d}", "task": "t2i", "prompt": f"prompt {i}", "num_samples": 2, "seed": None, "image": None,
             "params": None, "shot": i, "model": "forged"} for i in range(12)]
    rows[3]["prompt"] = "please explode"  # fails inside the GPU stage
    rows[4]["prompt"] = ""  # fails validation
    rows[5]["params"] = '{"bogus": 1}'
    rows[6].update(task="edit", image=png((255, 0, 0, 128)))
    rows[7].update(task="edit", image=b"definitely not an image")
    rows[8].update(task="edit", image=b"")
    rows.append(dict(rows[0], prompt="dup of r00"))
    rows[9]["seed"] = 42
    return rows


def read(url: str, dataset: str) -> pa.Table:
    fs, path = filesystem(url)
    fs.invalidate_cache(f"{path}/{dataset}")  # s3fs caches listings per process; the workers wrote since
    files = sorted(fs.glob(f"{path}/{dataset}/*.parquet"))
    return pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files]) if files else None


def spec_for(manifest, output, *sets):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output},
                     ["stages.shade.device=cpu", "outputs.rows_per_shard=6", *sets])


def test_s3_manifest_to_s3_outputs_with_bad_rows(ray_cluster, bucket):
    manifest = write_manifest(f"{bucket}/in/manifest.parquet", manifest_rows())
    out = f"{bucket}/out"
    result = run_job(spec_for(manifest, out, "outputs.webdataset=true"), interactive=False)

    assert result["status"] == "completed"
    assert result["committed"] == result["expected"] == 7 * 2 + 5 * 2 + 1  # 7 good rows, 5 bad rows (x2 samples), 1 dup
    errors = {(r["id"], r["sample_index"]): (r["stage"], r["kind"]) for r in read(out, "errors").to_pylist()}
    assert errors[("r03", 0)] == ("shade", "RuntimeError") and errors[("r03", 1)] == ("shade", "RuntimeError")
    assert errors[("r04", -1)] == ("validate", "empty_prompt")
    assert errors[("r05", -1)] == ("validate", "bad_params")
    assert errors[("r07", 0)] == ("noise", "bad_image") and errors[("r08", -1)] == ("validate", "missing_input")
    assert errors[("r00", -2)] == ("validate", "duplicate_id")
    assert result["errors_by_kind"] == {"RuntimeError": 2, "bad_image": 2, "bad_params": 1, "duplicate_id": 1, "empty_prompt": 1, "missing_input": 1}

    images = read(out, "images")
    keys = sorted(zip(images["id"].to_pylist(), images["sample_index"].to_pylist()))
    good = ["r00", "r01", "r02", "r06", "r09", "r10", "r11"]
    assert keys == [(i, s) for i in good for s in (0, 1)]
    row = images.filter(pa.compute.equal(images["id"], "r09")).to_pylist()[0]
    assert row["seed"] == 42 and row["family"] == "toy" and row["shot"] == 9
    assert row["model"] == "toy-v1" and row["extra_model"] == "forged"  # a manifest column never replaces provenance
    assert json.loads(row["sampler"]) == {"size": 16, "gain": 1.0}
    # the GPU stage ran on an actor that Ray gave one of the 2 declared GPUs
    assert set(images["gpu_id"].to_pylist()) <= {0.0, 1.0}
    img = Image.open(io.BytesIO(row["image"]["bytes"]))
    assert img.format == "PNG" and img.size == (16, 16)
    emb = read(out, "embeddings")
    assert emb.num_rows == 14 and emb.schema.field("mean_color").type == pa.list_(pa.float32(), 3)

    fs, path = filesystem(out)
    assert fs.glob(f"{path}/webdataset/*.tar")
    summary = json.loads(fs.cat_file(f"{path}/_summary.json"))
    assert summary["committed"] == result["committed"] and summary["images"] == 14
    assert set(summary["stage_rows_per_second"]) == {"noise", "shade"}
    # credentials never leak into what the job writes
    for f in fs.find(path):
        assert b"testing-secret-value" not in fs.cat_file(f)


def test_same_images_whatever_the_batch_size_and_rerun_is_a_no_op(ray_cluster, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"k{i}", "prompt": "p", "num_samples": 3} for i in range(5)])
    run_job(spec_for(manifest, str(tmp_path / "a"), "stages.shade.batch_size=1", "stages.noise.batch_size=1"), interactive=False)
    run_job(spec_for(manifest, str(tmp_path / "b"), "stages.shade.batch_size=7", "stages.shade.replicas=2"), interactive=False)
    a, b = read(str(tmp_path / "a"), "images"), read(str(tmp_path / "b"), "images")
    by_key = lambda t: {(r["id"], r["sample_index"]): r["image"]["bytes"] for r in t.to_pylist()}
    assert by_key(a) == by_key(b) and len(by_key(a)) == 15
    assert len(set(by_key(a).values())) == 15  # every sample has its own noise
    again = run_job(spec_for(manifest, str(tmp_path / "a"), "stages.shade.batch_size=3"), interactive=False)
    assert again["this_run"]["rows"] == 0 and again["committed"] == 15


def test_resume_with_changed_settings_is_refused_unless_new_run(ray_cluster, tmp_path):
    from pipeline.resume import ResumeError

    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "p"}])
    out = str(tmp_path / "o")
    run_job(spec_for(manifest, out), interactive=False)
    with pytest.raises(ResumeError, match=r"sampler.t2i: None -> \{'gain': 2\}|sampler"):
        run_job(spec_for(manifest, out, "sampler.t2i.gain=2"), interactive=False)
    result = run_job(spec_for(manifest, out, "sampler.t2i.gain=2"), new_run=True, interactive=False)
    assert result["images"] == 1 and json.loads(read(out, "images")["sampler"][0].as_py())["gain"] == 2.0
