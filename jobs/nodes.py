"""What a cluster of several nodes asks of a job: storage every node sees, a model every node reads.

On one node a local path is as good as a bucket. On several, a worker writes OUTPUT (and
reads the manifest) on whichever node Ray put it: a local path there is another disk, so
shards would scatter over machines and resumes would find nothing. And each stage's actor
loads the model on its own node: a path that only the driver's machine has fails there,
after minutes of queueing, once per replica. Both are asked right after connecting, before
any actor starts; each answer is one line naming what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.spec import JobSpec, SpecError

# how long the per-node model checks may take: a node that cannot even start a worker is named, not waited on forever
MODEL_CHECK_SECONDS = 300.0


def is_local_path(url: str) -> bool:
    """A path on this machine's disks: no scheme, or file://."""
    return "://" not in url or url.startswith("file://")


def alive_nodes(nodes: Sequence[dict]) -> list[dict]:
    """`ray.nodes()` entries of the nodes alive now."""
    return [n for n in nodes if n.get("Alive")]


def node_label(node: dict) -> str:
    """A node as a person finds it: its address, and its id (several nodes may share an address)."""
    return f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:12]})"


def check_shared_storage(spec: JobSpec, nodes: Sequence[dict]) -> None:
    """More than one node: OUTPUT and the manifest must be on storage every node sees."""
    alive = alive_nodes(nodes)
    if len(alive) < 2:
        return
    for setting, url in (("output", spec.output), ("manifest", spec.manifest.path)):
        if is_local_path(url):
            raise SpecError(f"{setting} {url} is a local path, but the Ray cluster has {len(alive)} nodes: workers on other "
                            f"nodes would {'write to' if setting == 'output' else 'read from'} their own disks; "
                            "use object storage (s3://...)")


def model_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(setting, path) of each local model the job's actors load."""
    paths = [("model", spec.model)]
    if spec.scores.clip is not None:
        paths.append(("scores.clip.model", spec.scores.clip.model))
    return [(s, p) for s, p in paths if is_local_path(p)]


@ray.remote(num_cpus=0)  # no CPU: it must run even on a node whose CPUs the job's actors hold
def _unreadable(path: str) -> str | None:
    """Why this node cannot read `path` (None: it can): a directory must list, a file must open."""
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def unreadable_on(path: str, nodes: Sequence[dict]) -> list[str]:
    """'NODE: why' for each alive node that cannot read `path`, asked by a task pinned to each."""
    alive = alive_nodes(nodes)
    local = path.removeprefix("file://")
    refs = {_unreadable.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False))
            .remote(local): n for n in alive}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=MODEL_CHECK_SECONDS)
    problems = [f"{node_label(refs[r])}: {why}" for r in ready if (why := ray.get(r)) is not None]
    problems += [f"{node_label(refs[r])}: no answer in {MODEL_CHECK_SECONDS:g} s" for r in late]
    for r in late:
        ray.cancel(r, force=True)
    return problems


def check_models_readable(spec: JobSpec, nodes: Sequence[dict]) -> None:
    """More than one node: every node reads each local model path (the driver's reading it proves nothing there)."""
    alive = alive_nodes(nodes)
    if len(alive) < 2:
        return
    for setting, path in model_paths(spec):
        problems = unreadable_on(path, alive)
        if problems:
            raise SpecError(f"{setting} {path} is not readable on {len(problems)} of {len(alive)} nodes: " + "; ".join(problems)
                            + ". Every node needs the same path (a shared filesystem, or the model in the nodes' image)")


def check_cluster(spec: JobSpec, nodes: Sequence[dict]) -> None:
    """What several nodes ask of a job (nothing on one node)."""
    check_shared_storage(spec, nodes)
    check_models_readable(spec, nodes)
