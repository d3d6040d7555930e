"""SIGKILL a real driver process at chosen points; the next run finishes the job.

Every good (id, sample) must exist exactly once, every bad row must be in errors exactly
once, and every image must be byte-identical to an uninterrupted run's. The points are
reached by holding one kind of request in the proxy in front of the store (a shard's tar,
a commit record, the summary) and killing the driver while it waits there: events, never
the clock.
"""

import pytest

from jobs.driver import run_job
from pipeline.report import status
from pipeline.resume import list_commits, shard_of
from pipeline.spec import load_spec
from pipeline.storage import filesystem
from tests.conftest import TOY, write_manifest
from tests.reliability.conftest import assert_no_debris, images_by_key
from tests.reliability.procs import kill_driver, start_driver, tail, wait_for, wait_for_commits
from tests.test_job_s3 import read

pytestmark = pytest.mark.reliability

SETS = ["stages.shade.device=cpu", "outputs.rows_per_shard=4", "outputs.webdataset=true", "stages.shade.batch_size=4",
        "stages.noise.batch_size=4"]


def rows():
    out = [{"id": f"c{i:02d}", "prompt": f"p{i}", "num_samples": 1 + i % 3, "gpu": ""} for i in range(18)]
    out[2]["prompt"] = "explode"  # fails in the GPU stage
    out[5]["prompt"] = ""  # fails validation
    out.append({"id": "c07", "prompt": "dup", "num_samples": 1, "gpu": ""})
    return out


# where each driver dies: the request it is killed at (method, path under the output, held before the
# store sees it or after the store answered, how many such requests pass first), and which files of the
# shard that request belongs to exist when it dies
POINTS = [
    ("start-up: lease taken, nothing written yet", "PUT", "/_job.json$", "before", 0, None),
    ("mid-shard: images and embeddings written, the shard's tar not", "PUT", "/webdataset/", "before", 2,
     {"images", "embeddings"}),
    # (a shard held at its commit holds images or, when all its samples failed, only errors)
    ("between a shard's files and its commit record", "PUT", "/_commits/", "before", 1, "files, no commit"),
    ("right after a commit: stored, the writer not told", "PUT", "/_commits/", "after", 1, "files and commit"),
    ("during the summary: every pair committed", "PUT", "/_summary.json$", "before", 0, None),
]
FILES = {"images": "parquet", "embeddings": "parquet", "webdataset": "tar", "errors": "parquet", "_commits": "parquet"}
MADE = {"images", "embeddings", "webdataset"}  # a shard with a made sample has all three


def shard_files_as_expected(got: set[str], expected: set[str] | str) -> bool:
    if isinstance(expected, set):
        return got - {"errors"} == expected
    data = got - {"_commits"}
    return (MADE <= data or data == {"errors"}) and (("_commits" in got) == (expected == "files and commit"))


def spec(manifest, output):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output}, SETS)


def files_of(output, held_path):
    """Which files of the shard a held request belongs to exist."""
    fs, root = filesystem(output)
    fs.invalidate_cache()
    shard = shard_of(held_path)
    return {d for d, ext in FILES.items() if fs.exists(f"{root}/{d}/{shard}.{ext}")}


def test_sigkill_at_five_points_then_resume(ray_cluster, ray_address, s3_server, bucket, tmp_path):
    manifest = write_manifest(f"{bucket}/m/manifest.parquet", rows())
    reference = f"{bucket}/reference"
    run_job(spec(manifest, reference), interactive=False)
    proxy, output = s3_server["proxy"], f"{bucket}/crashy"
    prefix = output.removeprefix("s3://")

    for i, (point, method, path, when, skip, files) in enumerate(POINTS):
        log = tmp_path / f"driver-{i}.log"
        with proxy.holding(method, f"/{prefix}{path}", when, skip) as hold:
            # each driver resumes what the one before left (a fresh process, on the same cluster)
            proc = start_driver(manifest, output, SETS, log=log, ray_address=ray_address)
            assert wait_for(hold.reached.is_set, proc), f"{point}: the driver ended first\n{tail(log)}"
            kill_driver(proc)
            # the writer held there (the driver, or a worker of its job, which Ray ends with it) is gone:
            # the held request is dropped, never retried
            assert wait_for(hold.gone.is_set), point
        if files is not None:
            got = files_of(output, hold.held[0])
            assert shard_files_as_expected(got, files), (point, got)
        if i == 0:
            assert list_commits(output) == [], point
        if i == len(POINTS) - 1:
            assert status(output)["committed"] == status(output)["expected"], point
        images_by_key(output)  # whatever a killed run left, no pair is committed twice

    # the last driver died with every pair committed: the next run only writes the summary
    result = run_job(spec(manifest, output), interactive=False)
    assert result["status"] == "completed" and result["missing"] == 0 and result["this_run"]["rows"] == 0

    ref, got = images_by_key(reference), images_by_key(output)
    expected_good = {(r["id"], s) for r in rows()[:18] if r["id"] not in ("c02", "c05") for s in range(r["num_samples"])}
    assert set(got) == expected_good and got == ref  # 0 missing, 0 duplicates, the same bytes
    assert read(output, "embeddings").num_rows == len(expected_good)
    errors = read(output, "errors")
    err_keys = list(zip(errors["id"].to_pylist(), errors["sample_index"].to_pylist(), errors["kind"].to_pylist()))
    assert sorted(err_keys) == [("c02", 0, "RuntimeError"), ("c02", 1, "RuntimeError"), ("c02", 2, "RuntimeError"),
                                ("c05", -1, "empty_prompt"), ("c07", -2, "duplicate_id")]
    assert_no_debris(output)


def test_slow_stages_commit_by_age_so_a_crash_loses_little(ray_cluster, ray_address, tmp_path):
    """Shards of 1000 rows behind a stage that stops at a gate (row 12 waits there until the test
    opens it): nothing fills a shard, so whatever is committed before the gate opens was committed
    by age (max_shard_seconds), while the run goes on. A driver killed then has lost little."""
    rows = [{"id": f"s{i:02d}", "prompt": "gate-1" if i == 12 else "p"} for i in range(24)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    output, gates = str(tmp_path / "out"), tmp_path / "gates"
    gates.mkdir()
    sets = ["stages.shade.device=cpu", "stages.shade.batch_size=2", "stages.noise.batch_size=2", f"stages.shade.options.gate_dir={gates}",
            "outputs.rows_per_shard=1000", "outputs.max_shard_seconds=0.5"]
    log = tmp_path / "driver.log"
    proc = start_driver(manifest, output, sets, log=log, ray_address=ray_address)
    assert wait_for_commits(output, 1, proc), tail(log)
    assert proc.poll() is None, tail(log)  # it cannot end: row 12 waits at the gate
    kill_driver(proc)
    done_before = sum(read_commit(p).num_rows for p in list_commits(output))
    assert 0 < done_before <= 12  # committed by age, never past the gate
    (gates / "open-1").touch()
    resumed = run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output}, sets), interactive=False)
    # (at most: a write task of the killed job may still land a shard in the moment before Ray ends it)
    assert resumed["status"] == "completed" and resumed["this_run"]["rows"] <= 24 - done_before
    assert sorted(images_by_key(output)) == [(f"s{i:02d}", 0) for i in range(24)]


def read_commit(path):
    import pyarrow.parquet as pq

    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=["id"])
