"""SIGKILL a real driver subprocess at several points; the next run finishes the job.

Every good (id, sample) must exist exactly once, every bad row must be in errors
exactly once, and every image must be byte-identical to an uninterrupted run's.
"""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa

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


def start_driver(manifest, output):
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", output]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_driver(proc, grace=3.0):
    """SIGKILL the driver alone. Ray ends a dead driver's workers, but the local
    cluster's daemons (GCS, raylet) it started outlive it: end them as a machine
    reboot would, so that nothing of the dead run can race the next one."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + grace
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)


def wait_for_commits(output, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list_commits(output)) >= n:
            return True
        time.sleep(0.2)
    return False


def test_sigkill_at_several_points_then_resume(ray_cluster, bucket):
    manifest = write_manifest(f"{bucket}/m/manifest.parquet", rows())
    reference = f"{bucket}/reference"
    run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": reference}, SETS[:-2]), interactive=False)

    output = f"{bucket}/crashy"
    commits_seen = []
    # kill: during start-up; after the first shard; after several shards
    for wait_commits in (0, 1, 4):
        proc = start_driver(manifest, output)
        if wait_commits == 0:
            time.sleep(3)
        else:
            assert wait_for_commits(output, len(list_commits(output)) + wait_commits, proc), proc.stdout.read().decode()[-3000:]
        assert proc.poll() is None, "the driver finished before it could be killed"
        kill_driver(proc)
        commits_seen.append(len(list_commits(output)))
    assert commits_seen[-1] > commits_seen[0]

    proc = start_driver(manifest, output)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log[-3000:]

    ref, got = read(reference, "images"), read(output, "images")
    keys = list(zip(got["id"].to_pylist(), got["sample_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "a pair was written twice"
    ref_images = dict(zip(zip(ref["id"].to_pylist(), ref["sample_index"].to_pylist()), ref["image"].to_pylist()))
    assert dict(zip(keys, got["image"].to_pylist())) == ref_images
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
