"""`genfleet submit` through Ray Jobs to a real cluster head (with its dashboard)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, TOY, free_port, write_manifest


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head started with `ray start --block` (1 declared GPU), torn down
    with its process group. Token auth is on by default in Ray 2.60. Its job agent gets
    its own port: the session's Ray already holds the default one (52365)."""
    port, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--num-gpus=1", "--include-dashboard=true",
                             "--disable-usage-stats"], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # job entrypoints run `python`: this interpreter, as on a cluster built from one image
                            env={**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])})
    address = f"http://127.0.0.1:{dash}"
    while True:  # until the dashboard answers (or the head has died)
        assert proc.poll() is None, "ray start --head exited"
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401: up, wants its token
            break
        except OSError:
            time.sleep(0.5)
    yield address
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    current = Path("/tmp/ray/ray_current_cluster")  # so later drivers start their own Ray
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_submit_runs_the_job_on_the_cluster(ray_head, tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"s{i}", "prompt": "p"} for i in range(3)] + [{"id": "bad", "prompt": ""}])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", ray_head, "--working-dir", str(ROOT), "--wait",
                        "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(out), "--set", "stages.shade.device=cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "submitted raysubmit_" in p.stdout and "job completed" in p.stdout
    images = pq.read_table(str(out / "images"))
    assert sorted(images["id"].to_pylist()) == ["s0", "s1", "s2"]
    # the stage ran on the cluster's declared GPU
    assert set(images["gpu_id"].to_pylist()) == {0.0}
    assert pq.read_table(str(out / "errors"))["kind"].to_pylist() == ["empty_prompt"]
    # without --wait the job runs on: the CLI says how to follow it (here a resume with nothing left to do)
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", ray_head, "--working-dir", str(ROOT),
                        "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(out), "--set", "stages.shade.device=cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    submitted, hint = p.stdout.strip().splitlines()[-2:]
    job_id = submitted.removeprefix("genfleet: submitted ")
    assert job_id.startswith("raysubmit_") and hint == (f"genfleet: follow it with `ray job logs --address {ray_head} --follow {job_id}`, "
                                                        f"or `genfleet status {out}`")
