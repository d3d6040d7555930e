"""One writer per OUTPUT: the lease, a second driver refused at once, a dead driver's Ray
reaped, and no commit from a run that lost its lease."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jobs.driver import reap_orphaned_ray
from pipeline.lease import LEASE_FILE, LeaseHeld, LeaseLost, acquire, check, read_lease, release
from pipeline.resume import list_commits
from pipeline.sample import Outputs, Sample
from pipeline.sink import SinkConfig, write_shard
from tests.conftest import ROOT, TOY, write_manifest
from tests.test_crash_resume import group_alive


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lease_is_exclusive_and_stale_leases_are_taken_over(where, tmp_path, request):
    output = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('bucket')}/out"
    first = acquire(output)
    with pytest.raises(LeaseHeld, match=rf"is being written by .*:{os.getpid()} since .*; use --takeover if that job is dead"):
        acquire(output)
    check(output, first.owner)
    second = acquire(output, takeover=True)
    with pytest.raises(LeaseLost):
        check(output, first.owner)
    release(output, first)  # not ours any more: left alone
    assert read_lease(output).owner == second.owner
    # a lease whose heartbeat stopped long ago is free
    from pipeline.storage import filesystem, join, write_atomic

    fs, root = filesystem(output)
    write_atomic(fs, join(root, LEASE_FILE), json.dumps({**second.__dict__, "heartbeat": time.time() - 3600}).encode())
    third = acquire(output)
    assert read_lease(output).owner == third.owner
    # a holder that ran here and is gone (a crash) leaves a lease the next run takes at once
    write_atomic(fs, join(root, LEASE_FILE), json.dumps({**third.__dict__, "pid": dead_pid()}).encode())
    fourth = acquire(output)
    release(output, fourth)
    assert read_lease(output) is None


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path):
    output = str(tmp_path / "out")
    mine = acquire(output)
    acquire(output, takeover=True)
    sample = Sample(id="a", sample_index=0, task="t2i", outputs=Outputs(image=b"png", image_size=(1, 1),
                                                                     embeddings={"e": np.zeros(2, np.float32)}))
    with pytest.raises(LeaseLost):
        write_shard([sample], SinkConfig(output=output, family="f", model="m", lease_owner=mine.owner))
    assert list_commits(output) == []


SLOW = ["--set", "stages.shade.num_gpus=0", "--set", "stages.shade.batch_size=1", "--set", "outputs.rows_per_shard=2"]


def start(manifest, output, *extra):
    """A driver whose toy stage takes 1 s a sample (TOY_SLEEP: not part of the job's settings)."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", output,
           *SLOW, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "TOY_SLEEP": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc):
    while proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_a_second_driver_is_refused_and_a_killed_one_is_reaped_and_taken_over(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"r{i}", "prompt": "p"} for i in range(30)])
    output = str(tmp_path / "out")
    first = start(manifest, output)
    assert wait_for(lambda: len(list_commits(output)) >= 1, first), first.communicate()[1][-2000:]

    second = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest,
                             "--output", output, *SLOW], cwd=ROOT, capture_output=True, text=True)
    last = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and last.startswith(f"genfleet: error: {output} is being written by ")
    assert f":{first.pid} since {time.strftime('%Y-%m-%d', time.gmtime())}" in last and last.endswith("use --takeover if that job is dead")

    os.kill(first.pid, signal.SIGKILL)  # the driver alone: what its Ray started lives on, orphaned
    first.wait()
    assert group_alive(first.pid), "nothing was orphaned: the test proves nothing"
    assert reap_orphaned_ray()
    while group_alive(first.pid):  # what was not killed (nothing of Ray) exits on its own
        time.sleep(0.2)
    taken = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest,
                            "--output", output, *SLOW, "--takeover"], cwd=ROOT, capture_output=True, text=True)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["committed"] == 30
    assert read_lease(output) is None  # released at the end
