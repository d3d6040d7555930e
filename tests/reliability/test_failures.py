"""Failures that a later attempt may cure are never recorded as final; a job that fails most
of its rows stops; permanent errors can be run again on request. Real local Ray, moto
behind a fault-injecting proxy, the toy family's real stages."""

import io
import json
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from pipeline.outcome import JobIncomplete, JobStopped
from pipeline.report import status
from pipeline.resume import list_commits
from pipeline.spec import load_spec
from pipeline.storage import filesystem
from tests.conftest import TOY, write_manifest
from tests.test_job_s3 import read

pytestmark = pytest.mark.reliability


def spec(manifest, output, *sets):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output},
                     ["stages.shade.device=cpu", "outputs.rows_per_shard=4", *sets])


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def by_key(table):
    return {(r["id"], r["sample_index"]): r["image"] for r in table.to_pylist()}


class Watcher(threading.Thread):
    """Opens every object that appears under `output` (straight from moto, past the faulty proxy) while
    a job writes it, and checks that it is whole: Parquet that reads to its end, a tar whose members
    all read, JSON that parses, a report that ends. Anything else is recorded in `partial`."""

    def __init__(self, endpoint: str, output: str):
        super().__init__(daemon=True)
        import boto3

        self.s3 = boto3.client("s3", endpoint_url=endpoint)
        self.bucket, _, self.prefix = output.removeprefix("s3://").partition("/")
        self.stop, self.seen, self.partial = threading.Event(), {}, []

    def sweep(self) -> None:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
        for obj in (o for page in pages for o in page.get("Contents", [])):
            key, etag = obj["Key"], obj["ETag"]
            if self.seen.get(key) == etag:
                continue
            try:
                data = self.s3.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)["Body"].read()
            except self.s3.exceptions.ClientError:  # replaced or removed since the listing: the next sweep sees it
                continue
            self.seen[key] = etag
            try:
                whole(key, data)
            except Exception as e:  # noqa: BLE001 - what was wrong with it is the finding
                self.partial.append(f"{key}: {type(e).__name__}: {e}")

    def run(self) -> None:
        while not self.stop.is_set():
            self.sweep()
            self.stop.wait(0.1)  # a breath between listings: the job shares two cores with this thread


def whole(key: str, data: bytes) -> None:
    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows > 0
        if "/images/" in key:
            for image in table["image"].to_pylist():
                Image.open(io.BytesIO(image["bytes"])).load()
    elif key.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = tar.getmembers()
            assert members and all(len(tar.extractfile(m).read()) == m.size for m in members)
    elif key.endswith(".json"):
        json.loads(data)
    elif key.endswith(".html"):
        assert data.rstrip().endswith(b"</html>")
    elif key.endswith("/README.md"):  # the dataset card: front matter, then text
        assert data.decode().startswith("---\n") and data.count(b"---\n") >= 2
    else:
        raise AssertionError("an object the output should not hold")


def test_a_store_failing_one_request_in_ten_loses_nothing(ray_cluster, s3_server, bucket):
    """Manifest, input images and outputs on S3 behind a proxy that fails 10% of requests
    (503, 500, connection resets): every row lands, no error rows, the same bytes as a clean run,
    and no object under the output is ever seen partial."""
    fs, root = filesystem(bucket)
    for i in range(8):
        fs.pipe_file(f"{root}/inputs/{i}.png", png((30 * i, 30, 200)))
    rows = [{"id": f"t{i}", "prompt": f"p{i}", "num_samples": 2, "task": "t2i", "image": None} for i in range(12)]
    rows += [{"id": f"e{i}", "prompt": "edit", "num_samples": 1, "task": "edit", "image": f"{bucket}/inputs/{i}.png"} for i in range(8)]
    manifest = write_manifest(f"{bucket}/m/manifest.parquet", rows)
    sets = ["outputs.rows_per_shard=2", "outputs.webdataset=true"]  # many small shards: many requests
    clean = run_job(spec(manifest, f"{bucket}/clean", *sets), interactive=False)
    assert clean["images"] == 32

    proxy = s3_server["proxy"]
    faults_before = proxy.faults
    watcher = Watcher(s3_server["direct"], f"{bucket}/flaky")
    watcher.start()
    proxy.fault_rate = 0.1
    try:
        result = run_job(spec(manifest, f"{bucket}/flaky", *sets), interactive=False)
    finally:
        proxy.fault_rate = 0.0
        watcher.stop.set()
        watcher.join()
    seen_while_running = len(watcher.seen)
    watcher.sweep()  # and what is there at the end
    assert watcher.partial == []
    assert seen_while_running >= 10, "the watcher saw too little of the run to mean anything"
    assert proxy.faults - faults_before >= 5, "the proxy injected too few faults for the test to mean anything"
    assert result["status"] == "completed" and result["committed"] == result["expected"] == 32
    assert result["errors"] == 0 and result["retryable"] == 0
    assert read(f"{bucket}/flaky", "errors") is None and read(f"{bucket}/flaky", "retries") is None
    assert by_key(read(f"{bucket}/flaky", "images")) == by_key(read(f"{bucket}/clean", "images"))
    assert sum(k.startswith("flaky/_commits/") for k in watcher.seen) == len(list_commits(f"{bucket}/flaky"))


def test_transient_failures_are_not_final_and_run_again(ray_cluster, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"r{i}", "prompt": "flaky" if i == 2 else "ok"} for i in range(6)])
    out = str(tmp_path / "out")
    (tmp_path / "tries").mkdir()
    sets = [f"stages.shade.options.flaky_dir={tmp_path / 'tries'}", "stages.shade.options.flaky_failures=4", "errors.attempts=2"]
    with pytest.raises(JobIncomplete, match=r"1 of 6 .* not committed; 1 failed transiently"):
        run_job(spec(manifest, out, *sets), interactive=False)
    assert read(out, "errors") is None  # nothing recorded as final
    retries = read(out, "retries")
    assert retries["id"].to_pylist() == ["r2"] and retries["kind"].to_pylist() == ["ConnectionResetError"]
    st = status(out)
    assert (st["committed"], st["retryable"], st["state"]) == (5, 1, "incomplete")
    # the next run makes only that pair, and now the store answers
    again = run_job(spec(manifest, out, *sets), interactive=False)
    assert again["status"] == "completed" and again["this_run"]["rows"] == 1 and again["committed"] == 6
    assert sorted(read(out, "images")["id"].to_pylist()) == [f"r{i}" for i in range(6)]
    assert status(out)["retryable"] == 0


def test_retry_errors_runs_permanent_errors_again(ray_cluster, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"r{i}", "prompt": "reject" if i < 2 else "ok"} for i in range(5)])
    out, accept = str(tmp_path / "out"), tmp_path / "accept"
    sets = [f"stages.shade.options.accept_if={accept}"]
    first = run_job(spec(manifest, out, *sets), interactive=False)
    assert first["errors_by_kind"] == {"rejected": 2} and first["images"] == 3
    accept.write_text("")  # the cause is fixed
    assert run_job(spec(manifest, out, *sets), interactive=False)["this_run"]["rows"] == 0  # a plain re-run keeps them
    fixed = run_job(spec(manifest, out, *sets), retry_errors=True, interactive=False)
    assert fixed["status"] == "completed" and fixed["errors"] == 0 and fixed["images"] == 5 and fixed["this_run"]["rows"] == 2
    assert read(out, "errors") is None
    assert sorted(read(out, "retired_errors")["id"].to_pylist()) == ["r0", "r1"]  # kept as history
    images = read(out, "images")
    assert sorted(zip(images["id"].to_pylist(), images["sample_index"].to_pylist())) == [(f"r{i}", 0) for i in range(5)]


def test_a_job_failing_most_rows_stops(ray_cluster, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": "reject" if i % 4 else "ok"} for i in range(40)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    with pytest.raises(JobStopped, match=r"of the last \d+ samples failed .* errors.max_rate 20%; most: rejected="):
        run_job(spec(manifest, out, "errors.window=8", "outputs.rows_per_shard=2", "stages.shade.batch_size=2"), interactive=False)
    assert status(out)["state"] == "stopped"


def test_manifest_columns_never_replace_output_columns(ray_cluster, tmp_path):
    rows = [{"id": "a", "prompt": "p", "num_samples": 3, "sample_index": 7, "model": "forged", "sampler": "{}", "_ordinal": 5,
             "format": "gif", "text": "t"}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = str(tmp_path / "out")
    result = run_job(spec(manifest, out, "outputs.webdataset=true"), interactive=False)
    assert result["committed"] == 3
    images = read(out, "images").to_pylist()
    assert sorted(r["sample_index"] for r in images) == [0, 1, 2]
    for r in images:
        assert (r["model"], r["format"], r["extra_model"], r["extra_sample_index"], r["extra_format"]) == ("toy-v1", "png", "forged", 7, "gif")
        assert r["_ordinal"] == 5  # the runner's own ordinal has a name no manifest can take
    assert pa.types.is_string(read(out, "images").schema.field("extra_sampler").type)
