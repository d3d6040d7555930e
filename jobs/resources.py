"""Will the job's actors fit? One answer for every stage, per node, before anything waits.

Ray Data waits forever for an actor that no node can hold, so the driver checks first:
each replica must fit on one node (a stage with `num_gpus: 2` needs a node with 2 GPUs,
not 2 GPUs somewhere in the cluster). For a local start the check runs before Ray starts,
against what the local Ray will declare; against a running cluster, right after connecting.
Every stage that does not fit is named in one message. Stages that each fit but not all at
once still run (Ray Data starts a stage's actors when an earlier stage's are gone): a warning.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.spec import JobSpec, SpecError

log = logging.getLogger("genfleet")

# CPU each plain task (reading with validation, fetching, encoding, writing) asks for, and so what the
# actors must leave for them to run at all. A whole CPU: Ray starts a worker process for each task
# running at once, and fractions let a 2-core machine run a dozen at once (each worker a second or
# two of imports to start), for no more work done
TASK_CPUS = 1.0


@dataclass(frozen=True)
class Node:
    name: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Pool:
    """One actor pool's demand: `min_replicas` actors of `num_gpus` and `num_cpus` each."""

    name: str
    num_gpus: float
    num_cpus: float
    min_replicas: int


def local_gpus() -> tuple[float, str]:
    """The GPUs a local Ray start will declare by itself, counted as Ray counts them (NVML, then
    CUDA_VISIBLE_DEVICES applies; Ray is pinned to one minor version, so its internal counter is
    stable here), and why. (Counting them with torch would cost the driver torch's import, 2 s.)"""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    gpus = get_accelerator_manager_for_resource("GPU")
    assert gpus is not None, "Ray knows NVIDIA GPUs"
    n = gpus.get_current_node_num_accelerators()
    visible = gpus.get_current_process_visible_accelerator_ids()
    if visible is not None:
        n = min(n, len(visible))
    return float(n), f"{n} CUDA device(s) visible" if n else "no CUDA device visible"


def local_cpus(spec: JobSpec, pools: Sequence[Pool]) -> int:
    """The CPUs a local start declares: this machine's cores for the job's tasks, plus what its
    actor pools hold at their minimum (`ray.num_cpus` overrides). More would only let more tasks
    run at once than there are cores: each a worker process to start, all slower for sharing."""
    if spec.ray.num_cpus:
        return spec.ray.num_cpus
    return (os.cpu_count() or 1) + math.ceil(sum(p.num_cpus * p.min_replicas for p in pools))


def local_nodes(spec: JobSpec, pools: Sequence[Pool]) -> tuple[list[Node], str]:
    """The one node a local start makes (jobs/driver.py connect), and a phrase saying why it has its GPUs."""
    cpus = float(local_cpus(spec, pools))
    if spec.ray.num_gpus is not None:
        gpus, why = float(spec.ray.num_gpus), "ray.num_gpus"
    else:
        gpus, why = local_gpus()
    return [Node("local", cpus, gpus)], why


def cluster_nodes(nodes: list[dict]) -> list[Node]:
    """Nodes as `ray.nodes()` lists them (the alive ones)."""
    return [Node(n.get("NodeManagerAddress", n.get("NodeID", "?")), float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in nodes if n.get("Alive")]


def _describe(nodes: Sequence[Node]) -> str:
    if len(nodes) == 1:
        return f"1 node: {nodes[0].cpus:g} CPUs, {nodes[0].gpus:g} GPUs"
    return f"{len(nodes)} nodes: " + ", ".join(f"{n.name} {n.cpus:g} CPUs/{n.gpus:g} GPUs" for n in nodes)


def _place(pools: Sequence[Pool], nodes: Sequence[Node]) -> tuple[dict[str, int], float]:
    """First fit, largest replicas first, of each pool's minimum replicas on the nodes:
    replicas that found no room, per pool, and the CPUs left over."""
    free = [[n.gpus, n.cpus] for n in nodes]
    replicas = sorted(((p, i) for p in pools for i in range(p.min_replicas)), key=lambda r: (-r[0].num_gpus, -r[0].num_cpus))
    short: dict[str, int] = {}
    for pool, _ in replicas:
        for room in free:
            if room[0] >= pool.num_gpus - 1e-9 and room[1] >= pool.num_cpus - 1e-9:
                room[0] -= pool.num_gpus
                room[1] -= pool.num_cpus
                break
        else:
            short[pool.name] = short.get(pool.name, 0) + 1
    return short, sum(room[1] for room in free)


def placement_problems(pools: Sequence[Pool], nodes: Sequence[Node]) -> list[str]:
    """The pools that cannot run at all: whose minimum replicas do not fit the nodes even
    with the other stages' actors gone (Ray Data then waits forever). Empty: each can run."""
    problems = []
    for p in pools:
        short, _ = _place([p], nodes)
        if short:
            need = f"{p.num_gpus:g} GPU(s) and {p.num_cpus:g} CPU(s) per replica on one node"
            problems.append(f"stages.{p.name} needs {need}; {short[p.name]} of its {p.min_replicas} replica(s) do not fit")
    return problems


def sharing_problems(pools: Sequence[Pool], nodes: Sequence[Node]) -> list[str]:
    """What keeps the stages from all running at once (each can run alone): a stage then waits
    for an earlier one to finish all its rows, and the rows in between pile up."""
    short, cpus_left = _place(pools, nodes)
    problems = [f"stages.{name} ({n} replica(s))" for name, n in short.items()]
    if not problems and cpus_left < TASK_CPUS - 1e-9:
        problems.append(f"reading and encoding (the actors take every CPU; they need {TASK_CPUS:g} more)")
    return problems


def check_placement(pools: Sequence[Pool], nodes: Sequence[Node], where: str) -> None:
    """Raise one SpecError naming every stage that cannot be placed on `nodes` (`where`: which Ray);
    warn when they fit only one after another."""
    problems = placement_problems(pools, nodes)
    if not problems:
        waiting = sharing_problems(pools, nodes)
        if waiting:
            log.warning("the stages do not all fit %s at once (%s): %s wait(s) for earlier stages to finish their rows; "
                        "give the job more GPUs/CPUs or fewer replicas to run them side by side", where, _describe(nodes), ", ".join(waiting))
        return
    raise SpecError(f"the job does not fit {where} ({_describe(nodes)}): " + "; ".join(problems)
                        + ". Run every stage on CPU with --cpu, put stages on CPU with --set stages.NAME.num_gpus=0, "
                          "use fewer replicas, or declare GPUs with --set ray.num_gpus=N")
