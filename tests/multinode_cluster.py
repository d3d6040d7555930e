"""A real Ray cluster of two nodes in its own process, running the jobs a test asks for.

tests/test_multinode.py starts this script as a subprocess (so that the session's one-node
Ray in the pytest process stays as it is) with a plan as JSON on stdin:

    {"nodes": {"num_cpus": 4, "num_gpus": 2, "count": 2}, "results": FILE,
     "steps": [{"job": NAME, "spec": {...}, "sets": [...]}
               | {"hide": DIR}]}

A job step runs `run_job` against the cluster: it records the result, or the one-line
SpecError that refused it, and where the job's actors ran (`ray.util.state.list_actors`:
node id and resources). A hide step adds a node whose filesystem lacks DIR: its raylet runs
in a mount namespace with an empty tmpfs over DIR (`unshare -m`), so a path the driver reads
is really missing there. The results go to FILE as JSON when every step is done. S3 comes
from the AWS environment the test passes on (moto's server in the pytest process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_alive(count: int) -> list[dict]:
    """Poll the GCS until `count` nodes are alive (a node joins asynchronously)."""
    while len(alive := [n for n in ray.nodes() if n["Alive"]]) < count:
        time.sleep(0.2)
    return alive


def run_step(step: dict, address: str, seen: set[str]) -> dict:
    from ray.util.state import list_actors

    from jobs.driver import run_job
    from pipeline.spec import SpecError, load_spec

    spec = load_spec(None, step["spec"], [*step.get("sets", []), f"ray.address={address}"])
    try:
        result = run_job(spec, interactive=False)
    except SpecError as e:
        return {"job": step["job"], "refused": str(e)}
    actors = [a for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False) if a.actor_id not in seen]
    seen.update(a.actor_id for a in actors)
    return {"job": step["job"], "result": result,
            "actors": [{"name": a.repr_name or a.class_name, "node_id": a.node_id, "resources": a.required_resources} for a in actors]}


def add_hidden_node(directory: str, address: str, num_cpus: float) -> subprocess.Popen:
    """A node started by `ray start` in its own mount namespace, where `directory` is an empty tmpfs."""
    ray_cli = Path(sys.executable).with_name("ray")
    script = 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"'
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", directory, str(ray_cli), "start",
                             f"--address={address}", f"--num-cpus={num_cpus:g}", "--num-gpus=0", "--block", "--disable-usage-stats"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    started = time.monotonic()
    plan = json.load(sys.stdin)
    nodes = plan["nodes"]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the nodes' workers inherit it
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": nodes["num_cpus"], "num_gpus": nodes["num_gpus"], "include_dashboard": True, "dashboard_port": free_port()})
    for _ in range(nodes["count"] - 1):
        cluster.add_node(num_cpus=nodes["num_cpus"], num_gpus=nodes["num_gpus"])
    hidden: list[subprocess.Popen] = []
    results: dict = {"steps": []}
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        results["nodes"] = [n["NodeID"] for n in wait_for_alive(nodes["count"])]
        seen: set[str] = set()
        results["start_seconds"] = round(time.monotonic() - started, 1)
        for step in plan["steps"]:
            began = time.monotonic()
            if "hide" in step:
                before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
                hidden.append(add_hidden_node(step["hide"], cluster.address, nodes["num_cpus"]))
                new = {n["NodeID"] for n in wait_for_alive(len(before) + 1)} - before
                results["steps"].append({"hidden_node": new.pop()})
            else:
                results["steps"].append(run_step(step, cluster.address, seen))
            results["steps"][-1]["seconds"] = round(time.monotonic() - began, 1)  # where a slow run spends its time
    finally:
        ray.shutdown()
        for p in hidden:  # the node's `ray start --block` and the raylet it started: their own process group
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()
        cluster.shutdown()
    Path(plan["results"]).write_text(json.dumps(results, default=str))


if __name__ == "__main__":
    main()
