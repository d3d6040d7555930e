"""Two drivers on one OUTPUT: started at once, they race for the lease (a conditional put on
S3); one wins, the other refuses at once, naming the winner, and writes nothing. The winner,
killed with SIGKILL alone, leaves its local Ray orphaned: the next start reaps it, and a
--takeover run finishes the job with every pair exactly once."""

import os
import socket
import subprocess
import sys

import pytest

from jobs.driver import reap_orphaned_ray
from pipeline.lease import read_lease
from pipeline.report import status
from pipeline.resume import list_commits, read_job
from tests.conftest import ROOT, TOY, write_manifest
from tests.reliability.conftest import assert_no_debris, images_by_key
from tests.reliability.procs import group_alive, start_driver, tail, wait_for

pytestmark = pytest.mark.reliability

SETS = ["stages.shade.num_gpus=0", "stages.shade.batch_size=1", "outputs.rows_per_shard=2"]
SLOW = {"TOY_SLEEP": "1"}  # 1 s a sample, so that the winner is still running when it is killed (not a job setting)


def test_two_drivers_on_one_output(ray_address, bucket, tmp_path):
    manifest = write_manifest(f"{bucket}/m/manifest.parquet", [{"id": f"r{i:02d}", "prompt": "p"} for i in range(30)])
    output = f"{bucket}/out"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (start_driver(manifest, output, SETS, log=log, env=SLOW) for log in logs)  # each would start its own Ray
    assert wait_for(lambda: a.poll() is not None or b.poll() is not None)
    (loser, loser_log), (winner, winner_log) = sorted([(a, logs[0]), (b, logs[1])], key=lambda p: p[0].poll() is None)

    assert loser.wait() == 2
    last = loser_log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"genfleet: error: {output} is being written by {socket.gethostname()}:{winner.pid} since ")
    assert last.endswith("; use --takeover if that job is dead")
    assert winner.poll() is None, tail(winner_log)
    lease = read_lease(output)
    assert lease is not None and lease.pid == winner.pid

    assert wait_for(lambda: len(list_commits(output)) >= 1, winner), tail(winner_log)
    winner.kill()  # SIGKILL of the driver alone: the Ray it started lives on, orphaned
    winner.wait()
    assert group_alive(winner.pid), "nothing was orphaned: the test proves nothing"
    assert reap_orphaned_ray()  # what the next start does first
    assert wait_for(lambda: not group_alive(winner.pid))  # what was not killed (nothing of Ray) exits on its own

    # the lease names a dead process: a takeover (here on the session's Ray, at full speed) finishes the job
    taken = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest,
                            "--output", output, *(x for s in SETS for x in ("--set", s)), "--takeover"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_address}, capture_output=True, text=True)
    assert taken.returncode == 0, taken.stderr[-2000:]
    st = status(output)
    assert st["state"] == "completed" and st["committed"] == st["expected"] == 30
    assert sorted(images_by_key(output)) == [(f"r{i:02d}", 0) for i in range(30)]  # each pair once
    assert len(read_job(output)["runs"]) == 2  # the winner's run and the takeover: the loser began none
    assert_no_debris(output)
    assert read_lease(output) is None  # released at the end
