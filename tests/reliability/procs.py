"""Real driver processes for the reliability tests: start `genfleet run`, wait for events
(a commit record, a file, a line of its log), kill it. Waits poll for events; none has a
time limit of its own (pytest-timeout is the backstop)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.resume import list_commits
from tests.conftest import ROOT, TOY

POLL = 0.1


def start_driver(manifest: str, output: str, sets: list[str], *extra: str, log: Path | None = None,
                 ray_address: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`genfleet run` of the toy family in its own process group. With `ray_address` it joins that
    cluster (as a driver on a cluster node does); without, it starts its own local Ray, whose
    processes join its group. Its output goes to `log` (a pipe left unread would stall it) or,
    without one, to a pipe for wait_for_line."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", output,
           *(x for s in sets for x in ("--set", s)), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    if log is None:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    with open(log, "w") as out:  # the child holds its own copy
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, text=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and everything in its process group (a local Ray it started: GCS,
    raylet, workers), as a machine reboot would, so that nothing of the dead run races the next."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(POLL)


def wait_for(predicate, proc: subprocess.Popen | None = None) -> bool:
    """True once `predicate()` holds; False if `proc` ended first."""
    while proc is None or proc.poll() is None:
        if predicate():
            return True
        time.sleep(POLL)
    return bool(predicate())


def wait_for_line(proc: subprocess.Popen, text: str) -> bool:
    assert proc.stdout is not None, "started with a log file: wait on something else"
    return any(text in line for line in proc.stdout)


def wait_for_commits(output: str, n: int, proc: subprocess.Popen) -> bool:
    while proc.poll() is None:
        if len(list_commits(output)) >= n:
            return True
        time.sleep(POLL)
    return False


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""
