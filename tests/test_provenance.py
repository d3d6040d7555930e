"""A real driver subprocess (on the session's Ray): `status` says running while it beats; Ctrl-C
(SIGINT) ends the run as `interrupted` with its provenance in _summary.json; a driver killed
with SIGKILL leaves a job, and a last run in the history, that `status` calls dead. Waits are
on events (a commit record, the process's exit), never on the clock."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

from pipeline.lease import read_lease
from pipeline.report import status
from pipeline.resume import list_commits
from pipeline.version import __version__
from tests.conftest import ROOT, TOY, write_manifest

SLOW = ["--set", "stages.shade.num_gpus=0", "--set", "stages.shade.batch_size=1", "--set", "outputs.rows_per_shard=2"]


def start(ray, manifest, output):
    """A driver whose toy stage takes 1 s a sample (TOY_SLEEP: not part of the job's settings)."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", output, *SLOW]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOY_SLEEP": "1", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_commits(output, n, proc):
    while proc.poll() is None:
        if len(list_commits(output)) >= n:
            return True
        time.sleep(0.2)
    return False


def test_status_running_interrupted_and_dead_with_provenance(ray_cluster, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"r{i}", "prompt": "p"} for i in range(40)])
    output = str(tmp_path / "out")
    driver = start(ray_cluster, manifest, output)
    assert wait_for_commits(output, 1, driver), driver.communicate()[1][-3000:]
    st = status(output)
    assert st["state"] == "running" and st["driver"].split(",")[0].endswith(f":{driver.pid}"), st
    assert [h["status"] for h in st["history"]] == ["running"]  # its record in _runs/, while its driver holds the lease

    driver.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = driver.communicate()
    assert driver.returncode == 130 and err.strip().splitlines()[-1].startswith("genfleet: interrupted"), err[-3000:]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["committed"] < 40, summary
    assert summary["genfleet_version"] == __version__ != "unknown" and summary["model_fingerprint"] == "toy-v1"
    started, ended = (datetime.fromisoformat(summary[k]) for k in ("started_at", "ended_at"))
    assert started.utcoffset().total_seconds() == 0 and started <= ended <= datetime.now(started.tzinfo)
    assert status(output)["state"] == "interrupted" and read_lease(output) is None
    assert [h["status"] for h in status(output)["history"]] == ["interrupted"]

    again = start(ray_cluster, manifest, output)  # resumes; then dies without a word
    assert wait_for_commits(output, len(list_commits(output)) + 1, again), again.communicate()[1][-3000:]
    assert status(output)["state"] == "running"
    os.kill(again.pid, signal.SIGKILL)
    again.wait()
    st = status(output)
    assert st["state"] == "dead" and f":{again.pid}," in st["driver"], st
    assert [h["status"] for h in st["history"]] == ["interrupted", "dead"], st["history"]  # its record was left at running
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "status", output], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "state                    dead" in proc.stdout and "run the same command again" in proc.stdout
