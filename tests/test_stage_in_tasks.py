"""A stage that keeps no model (StageSpec.resident False) runs in the job's CPU tasks, fused with
reading: no actor, built once per worker process and job, its samples in the stage's batch size.
A job that sets its replicas runs it in an actor pool instead. The family below is the test's own:
its stage tags each sample with the process, actor and batch that made it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from jobs.driver import dry_run, run_job
from pipeline.family import Demo, Params, StageContext, StageSpec, TaskSpec
from pipeline.sample import Result
from pipeline.spec import load_spec
from tests.conftest import write_manifest

FAMILY_REF = "tests.test_stage_in_tasks:FAMILY"
ROWS = 300
BATCH = 7


def _build_tag(ctx: StageContext):
    with open(ctx.options["builds"], "a") as f:  # one line per build, from whichever process builds
        f.write(f"{os.getpid()}\n")
    tag = ctx.options.get("tag", "")

    def run(samples):
        where = f"{os.getpid()} {ray.get_runtime_context().get_actor_id()} {tag} {len(samples)}"
        return [Result(text=f"{where} {s.prompt.upper()}", embeddings={"v": np.random.default_rng(s.sample_seed).random(2, dtype=np.float32)})
                for s in samples]

    return run


class NoParams(Params):
    pass


class TagFamily:
    name = "tag"
    tasks = {"t2i": TaskSpec(NoParams)}
    scores: dict[str, str] = {}

    def stages(self, model):
        return [StageSpec("tag", _build_tag, num_gpus=0, num_cpus=1, batch_size=BATCH, resident=False)]

    def check_model(self, model):
        pass

    def model_name(self, model):
        return "tag"

    def model_fingerprint(self, model):
        return "tag"

    def write_tiny(self, directory):
        return str(directory)

    def demo(self):
        return Demo([{"id": "t0", "prompt": "x"}], [])


FAMILY = TagFamily()


def _job(tmp_path: Path, name: str, *sets: str):
    manifest = tmp_path / "m.parquet"
    if not manifest.exists():  # two row groups: two read tasks
        write_manifest(str(manifest), {"id": [f"r{i:04d}" for i in range(ROWS)], "prompt": [f"p{i}" for i in range(ROWS)]},
                       row_group_size=ROWS // 2)
    builds = tmp_path / f"{name}.builds"
    spec = load_spec(None, {"family": FAMILY_REF, "model": "tag", "manifest": str(manifest), "output": str(tmp_path / name)},
                     [f"stages.tag.options.builds={builds}", *sets])
    return spec, builds


def _texts(out: Path) -> dict[str, list[str]]:
    table = pa.concat_tables(pq.read_table(f) for f in sorted((out / "texts").glob("*.parquet")))
    return {r["id"]: r["text"].split() for r in table.select(["id", "text"]).to_pylist()}


def test_a_stage_without_a_model_runs_in_tasks_built_once_per_process(ray_cluster, tmp_path):
    spec, builds = _job(tmp_path, "a", "stages.tag.options.tag=first")
    assert dry_run(spec)["stages"]["tag"].startswith("in the job's CPU tasks, batch 7")
    result = run_job(spec, interactive=False)
    assert result["status"] == "completed" and result["committed"] == ROWS
    texts = _texts(tmp_path / "a")
    assert sorted(texts) == [f"r{i:04d}" for i in range(ROWS)]
    pids = {t[0] for t in texts.values()}
    assert {t[1] for t in texts.values()} == {"None"}  # no sample was made in an actor
    assert {t[2] for t in texts.values()} == {"first"}
    assert all(t[4] == f"P{i[1:].lstrip('0') or '0'}" for i, t in texts.items())
    assert sorted(builds.read_text().split()) == sorted(pids)  # one build per process that ran the stage
    # batches of the stage's size, a shorter one at the end of a block (one read task here: a block or two)
    sizes = [int(t[3]) for t in texts.values()]
    assert max(sizes) == BATCH and sizes.count(BATCH) >= ROWS - 2 * BATCH

    # a second job with other options on the same Ray: its own build, in whichever process runs it
    spec, builds = _job(tmp_path, "b", "stages.tag.options.tag=second")
    assert run_job(spec, interactive=False)["committed"] == ROWS
    texts = _texts(tmp_path / "b")
    assert {t[2] for t in texts.values()} == {"second"}
    assert sorted(builds.read_text().split()) == sorted({t[0] for t in texts.values()})


def test_replicas_set_put_the_stage_in_an_actor_pool(ray_cluster, tmp_path):
    spec, builds = _job(tmp_path, "c", "stages.tag.replicas=1")
    assert dry_run(spec)["stages"]["tag"].startswith("1 replica(s) x 0 GPU / 1 CPU, batch 7")
    assert run_job(spec, interactive=False)["committed"] == ROWS
    texts = _texts(tmp_path / "c")
    actors = {t[1] for t in texts.values()}
    assert len(actors) == 1 and actors != {"None"}  # every sample made by the one actor
    assert len(builds.read_text().split()) == 1


def test_a_local_ray_declares_the_cores_for_tasks_plus_what_the_actor_pools_hold(tmp_path):
    from jobs.resources import Pool, local_cpus

    spec, _ = _job(tmp_path, "d")
    pools = [Pool("lmm", 1.0, 0.5, 2), Pool("vae", 0.0, 0.25, 1)]  # 1.25 CPUs held: 2 more declared
    assert local_cpus(spec, pools) == os.cpu_count() + 2
    assert local_cpus(spec, []) == os.cpu_count()
    spec, _ = _job(tmp_path, "d", "ray.num_cpus=3")
    assert local_cpus(spec, pools) == 3


def test_a_stage_with_a_model_co_located_with_one_in_tasks_puts_both_in_an_actor(tmp_path):
    from jobs.driver import plan_groups

    def light(name: str, resident: bool) -> StageSpec:
        return StageSpec(name, _build_tag, num_gpus=0, num_cpus=1, batch_size=BATCH, resident=resident)

    spec, _ = _job(tmp_path, "e", "stages.model.colocate=true")
    in_tasks = [g.in_tasks for g in plan_groups(spec, [light("tag", False), light("model", True)])]
    assert in_tasks == [False]  # one group, its model kept loaded in an actor
    in_tasks = [g.in_tasks for g in plan_groups(spec, [light("tag", False), light("light", False), light("model", True)])]
    assert in_tasks == [True, False]  # (model joins light, the stage before it)
    spec, _ = _job(tmp_path, "e", "stages.light.colocate=true")
    groups = plan_groups(spec, [light("tag", False), light("light", False)])
    assert [(g.in_tasks, [n for n, _, _ in g.stages]) for g in groups] == [(True, ["tag", "light"])]
