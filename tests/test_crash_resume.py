"""SIGKILL a real driver subprocess at several points; the next run finishes the job.

Every good (id, sample) must exist exactly once, every bad row must be in errors
exactly once, and every image must be byte-identical to an uninterrupted run's. The
waits are on events (a log line, a commit record), never on the clock.
"""

import os
import signal
import subprocess
import sys
import time

from jobs.driver import run_job
from pipeline.resume import list_commits, shard_of
from pipeline.spec import load_spec
from pipeline.storage import filesystem
from tests.conftest import ROOT, TOY, write_manifest
from tests.test_job_s3 import read

SETS = ["stages.shade.device=cpu", "outputs.rows_per_shard=3", "stages.shade.batch_size=2", "stages.noise.batch_size=2",
        "stages.shade.options.sleep=0.15", "ray.num_gpus=1", "ray.num_cpus=4"]


def rows():
    out = [{"id": f"c{i:02d}", "prompt": f"p{i}", "num_samples": 1 + i % 3, "gpu": ""} for i in range(16)]
    out[2]["prompt"] = "explode"  # fails in the GPU stage
    out[5]["prompt"] = ""  # fails validation
    out.append({"id": "c07", "prompt": "dup", "num_samples": 1, "gpu": ""})
    return out


def start_driver(manifest, output, sets=SETS):
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", output]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_driver(proc):
    """SIGKILL the driver and the local cluster it started (GCS, raylet, workers), as a
    machine reboot would, so that nothing of the dead run can race the next one."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.2)


def wait_for_line(proc, text):
    for line in proc.stdout:
        if text in line:
            return True
    return False


def wait_for_commits(output, n, proc):
    while proc.poll() is None:
        if len(list_commits(output)) >= n:
            return True
        time.sleep(0.2)
    return False


def keys_of(table):
    return list(zip(table["id"].to_pylist(), table["sample_index"].to_pylist()))


def test_sigkill_at_several_points_then_resume(ray_cluster, bucket):
    manifest = write_manifest(f"{bucket}/m/manifest.parquet", rows())
    reference = f"{bucket}/reference"
    run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": reference}, SETS[:-2]), interactive=False)

    output = f"{bucket}/crashy"
    commits_seen = []
    # kill: during start-up (once the plan is made); after the first shard; after several shards
    for wait_commits in (0, 1, 4):
        proc = start_driver(manifest, output)
        if wait_commits == 0:
            assert wait_for_line(proc, "pairs expected")
        else:
            assert wait_for_commits(output, len(list_commits(output)) + wait_commits, proc), proc.stdout.read()[-3000:]
        assert proc.poll() is None, "the driver finished before it could be killed"
        kill_driver(proc)
        commits_seen.append(len(list_commits(output)))
    assert commits_seen[-1] > commits_seen[0]

    # the resume in this process's Ray (a fresh driver, as a re-run would be)
    assert run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output}, SETS[:-2]),
                   interactive=False)["status"] == "completed"

    ref, got = read(reference, "images"), read(output, "images")
    keys = keys_of(got)
    assert len(keys) == len(set(keys)), "a pair was written twice"
    assert dict(zip(keys, got["image"].to_pylist())) == dict(zip(keys_of(ref), ref["image"].to_pylist()))
    expected_good = {(r["id"], s) for r in rows()[:16] if r["id"] not in ("c02", "c05") for s in range(r["num_samples"])}
    assert set(keys) == expected_good

    errors = read(output, "errors")
    err_keys = list(zip(errors["id"].to_pylist(), errors["sample_index"].to_pylist(), errors["kind"].to_pylist()))
    assert sorted(err_keys) == [("c02", 0, "RuntimeError"), ("c02", 1, "RuntimeError"), ("c02", 2, "RuntimeError"),
                                ("c05", -1, "empty_prompt"), ("c07", -2, "duplicate_id")]
    # no debris: every shard file belongs to a committed shard
    committed = {shard_of(p) for p in list_commits(output)}
    fs, path = filesystem(output)
    for f in fs.find(path):
        rel = f[len(path) + 1:]
        if "/" in rel:
            assert shard_of(rel) in committed, rel


def test_slow_stages_commit_by_age_so_a_crash_loses_little(ray_cluster, tmp_path):
    """Shards of 1000 rows behind a slow stage: without commits by age nothing would be
    committed before the end. With max_shard_seconds the work lands while the run goes on."""
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"s{i:02d}", "prompt": "p"} for i in range(24)])
    output = str(tmp_path / "out")
    sets = ["stages.shade.device=cpu", "stages.shade.batch_size=2", "stages.noise.batch_size=2", "stages.shade.options.sleep=0.3",
            "outputs.rows_per_shard=1000", "outputs.max_shard_seconds=0.5", "ray.num_gpus=1", "ray.num_cpus=4"]
    proc = start_driver(manifest, output, sets)
    assert wait_for_commits(output, 2, proc), proc.stdout.read()[-3000:]
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_driver(proc)
    done_before = sum(len(read_commit(p)) for p in list_commits(output))
    assert 0 < done_before < 24
    resumed = run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output}, sets[:-2]),
                      interactive=False)
    assert resumed["status"] == "completed" and resumed["this_run"]["rows"] == 24 - done_before
    keys = keys_of(read(output, "images"))
    assert sorted(keys) == [(f"s{i:02d}", 0) for i in range(24)]


def read_commit(path):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id"])
