"""One writer per OUTPUT: the lease, taken exclusively, taken over when stale, and no commit from
a run that lost its lease. Two real drivers on one OUTPUT: tests/reliability/test_two_drivers.py."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.lease import LEASE_FILE, LeaseHeld, LeaseLost, acquire, check, read_lease, release
from pipeline.resume import list_commits
from pipeline.rows import to_block
from pipeline.sample import Outputs, Sample
from pipeline.sink import SinkConfig, write_shard


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
        write_shard(to_block([sample]), SinkConfig(output=output, family="f", model="m", lease_owner=mine.owner))
    assert list_commits(output) == []
