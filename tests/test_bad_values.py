"""One manifest holding every hostile value found so far, with good rows around them: the job
ends with exit 0, every good pair committed exactly once, every bad row in errors with its
kind, and committed == expected."""

import io
import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.resume import begin_run, check_output, read_job
from tests.conftest import ROOT, TOY

LONG_ID = "long-" + "z" * 150
FORGED = "p\x1f0\x1ex\x1f0\x1ey"  # spells the keys of p, x and y in the old shard-name encoding
INF = float("inf")


def png(size=(8, 8), exif_rotate=False):
    img = Image.new("RGB", size, (200, 30, 30))
    buf = io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, "JPEG", exif=exif.tobytes())
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def corpus() -> tuple[pa.Table, dict[str, str], set[tuple[str, int]]]:
    deep = '{"gain": ' + "[" * 100_000 + "]" * 100_000 + "}"
    rows = [  # (id, prompt, seed, width, height, num_samples, params, task, image)
        ("p", "ok", 1.0, None, None, 1.0, None, "t2i", None),
        ("x", "ok", 2.0, None, None, 1.0, None, "t2i", None),
        ("y", "ok", 3.0, None, None, 1.0, None, "t2i", None),
        (FORGED, "ok", 4.0, None, None, 1.0, None, "t2i", None),
        ("seed-inf", "ok", INF, None, None, 1.0, None, "t2i", None),
        ("seed-ninf", "ok", -INF, None, None, 1.0, None, "t2i", None),
        ("width-inf", "ok", None, INF, None, 1.0, None, "t2i", None),
        ("height-ninf", "ok", None, None, -INF, 1.0, None, "t2i", None),
        ("n-inf", "ok", None, None, None, INF, None, "t2i", None),
        ("deep", "ok", None, None, None, 1.0, deep, "t2i", None),
        ("utf8", "BAD", None, None, None, 1.0, None, "t2i", None),
        (LONG_ID, "ok", None, 12.0, 10.0, 2.0, None, "t2i", None),
        ("bomb", "ok", None, None, None, 1.0, None, "edit", png((9000, 9000))),
        ("exif", "ok", None, None, None, 1.0, None, "edit", png((12, 4), exif_rotate=True)),
        ("g0", "ok", None, None, None, 3.0, '{"gain": 0.5}', "t2i", None),
    ]
    cols = list(zip(*rows))
    prompts = pa.array([p.encode() if p != "BAD" else b"caf\xe9 \xff" for p in cols[1]], pa.binary()).view(pa.string())
    n = len(rows)
    table = pa.table({
        "id": pa.array(cols[0], pa.string()), "prompt": prompts, "seed": pa.array(cols[2], pa.float64()),
        "width": pa.array(cols[3], pa.float64()), "height": pa.array(cols[4], pa.float64()),
        "num_samples": pa.array(cols[5], pa.float64()), "params": pa.array(cols[6], pa.string()),
        "task": pa.array(cols[7], pa.string()), "image": pa.array(cols[8], pa.binary()),
        # manifest columns named like the runner's own output columns and internals
        **{name: pa.array([f"forged-{name}"] * n) for name in ("model", "family", "format", "sampler", "text", "sample_seed")},
        "sample_index": pa.array([7] * n, pa.int64()), "_ordinal": pa.array(range(100, 100 + n), pa.int64()),
    })
    bad = {"seed-inf": "bad_seed", "seed-ninf": "bad_seed", "width-inf": "bad_width", "height-ninf": "bad_height",
           "n-inf": "bad_num_samples", "deep": "bad_params", "utf8": "bad_text", "bomb": "input_too_large"}
    good = {(r[0], s) for r in rows if r[0] not in bad for s in range(int(r[5]))}
    return table, bad, good


def test_every_hostile_value_is_a_row_error_and_the_rest_lands(tmp_path):
    table, bad, good = corpus()
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", str(tmp_path / "m.parquet"),
                        "--output", str(out), "--set", "stages.shade.num_gpus=0", "--set", "outputs.webdataset=true",
                        "--set", "outputs.rows_per_shard=64"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]

    images = pq.read_table(out / "images").to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in images]
    assert len(keys) == len(set(keys)) and set(keys) == good
    errors = pq.read_table(out / "errors").to_pylist()
    assert {e["id"]: e["kind"] for e in errors} == bad and len(errors) == len(bad)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["status"] == "completed" and summary["committed"] == summary["expected"] == len(good) + len(bad)
    for r in images:  # provenance is the job's; the manifest's same-named columns ride along renamed
        assert (r["model"], r["family"], r["format"]) == ("toy-v1", "toy", "png") and r["extra_model"] == "forged-model"
        assert r["extra_sample_index"] == 7 and r["_ordinal"] >= 100 and r["extra_sample_seed"] == "forged-sample_seed"
    exif = next(r for r in images if r["id"] == "exif")
    assert (exif["width"], exif["height"]) == (16, 16)  # the toy resizes its input to its output size; decoding went upright
    with tarfile.open(next((out / "webdataset").glob("*.tar"))) as tar:
        assert all(len(m.name) <= 100 for m in tar.getmembers())


def test_presigned_manifest_urls_are_redacted_where_written(tmp_path):
    out = str(tmp_path / "out")
    url = "https://store.example/m.parquet?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef&X-Amz-Security-Token=sessiontok"
    log = check_output(out, {"f": 1}, new_run=False)
    begin_run(out, {"f": 1}, manifest=url, expected_pairs=1, new_run=False, retry_errors=False, log=log)
    written = (tmp_path / "out" / "_job.json").read_text()
    for secret in ("AKIAEXAMPLE", "deadbeef", "sessiontok"):
        assert secret not in written
    assert read_job(out)["manifest"].startswith("https://store.example/m.parquet?")
