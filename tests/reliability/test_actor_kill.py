"""kill -9 of a stage actor's process, three times while its batch is in the middle of the stage:
Ray restarts the actor and retries the batch; the job completes with the bytes of an
uninterrupted run. The kills happen at gates (tests/toy_family.py, options.gate_dir): the
actor announces its pid and waits, the test kills that process, then opens the gate."""

import os
import signal
import threading
from pathlib import Path

import pytest

from jobs.driver import run_job
from pipeline.spec import load_spec
from tests.conftest import TOY, write_manifest
from tests.reliability.conftest import assert_no_debris, images_by_key
from tests.reliability.procs import wait_for

pytestmark = pytest.mark.reliability

GATES = (1, 2, 3)


def spec(manifest, output, gates: Path):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": output},
                     ["stages.shade.device=cpu", "stages.shade.batch_size=2", "stages.noise.batch_size=2", "outputs.rows_per_shard=4",
                      f"stages.shade.options.gate_dir={gates}"])


def kill_at_gates(gates: Path, killed: list[int], failures: list[BaseException]) -> None:
    try:
        for n in GATES:
            at = gates / f"at-{n}"
            wait_for(at.exists)
            wait_for(lambda: at.read_text().strip() != "")  # noqa: B023 - waited on in this iteration
            pid = int(at.read_text())
            # the stage's own process, a Ray worker (never this test's process)
            assert pid != os.getpid() and Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"), pid
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            (gates / f"open-{n}").touch()  # the batch, retried in the restarted actor, passes this time
    except BaseException as e:  # noqa: BLE001 - reported by the test
        failures.append(e)
    finally:
        for n in GATES:
            (gates / f"open-{n}").touch()  # never leave the job waiting


def test_a_stage_actor_killed_three_times_mid_job(ray_cluster, tmp_path):
    rows = [{"id": f"a{i:02d}", "prompt": f"p{i}", "num_samples": 1 + i % 2} for i in range(28)]
    for n, i in zip(GATES, (5, 13, 21)):
        rows[i]["prompt"] = f"gate-{n}"
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)

    open_gates = tmp_path / "open"
    open_gates.mkdir()
    for n in GATES:
        (open_gates / f"open-{n}").touch()
    reference = run_job(spec(manifest, str(tmp_path / "reference"), open_gates), interactive=False)

    gates = tmp_path / "gates"
    gates.mkdir()
    killed: list[int] = []
    failures: list[BaseException] = []
    killer = threading.Thread(target=kill_at_gates, args=(gates, killed, failures), daemon=True)
    killer.start()
    result = run_job(spec(manifest, str(tmp_path / "out"), gates), interactive=False)
    killer.join()
    assert not failures, failures
    assert len(set(killed)) == 3  # three processes: each kill hit the actor Ray had restarted
    assert result["status"] == "completed" and result["missing"] == 0 and result["committed"] == reference["committed"]
    got = images_by_key(str(tmp_path / "out"))  # 0 duplicates
    assert len(got) == sum(r["num_samples"] for r in rows) and got == images_by_key(str(tmp_path / "reference"))
    assert_no_debris(str(tmp_path / "out"))
