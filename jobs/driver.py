"""The driver: manifest -> validation -> family stages -> encode -> sink -> report.

Everything that can fail for the whole job (spec, manifest, model config, a
changed output) fails here before any model loads. Then one Ray Data streaming
pipeline runs: the manifest is read in batches, each model stage is an actor
pool that keeps its model resident, CPU work (validation, encoding, writing) runs
in plain tasks, and each write task commits one shard.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from jobs.ray_io import ManifestDatasource, OutputDatasink
from pipeline.encode import encode_block
from pipeline.families import get_family
from pipeline.family import RowError, StageContext
from pipeline.manifest import open_manifest
from pipeline.plan import make_plan
from pipeline.report import CommitWatcher, Progress, summary, write_summary
from pipeline.resume import start_run
from pipeline.sink import SinkConfig
from pipeline.spec import JobSpec, SpecError
from pipeline.stages import StageGroup
from pipeline.validate import TASKS, Expand

log = logging.getLogger("genfleet")
POLL_SECONDS = 2.0


def connect(spec: JobSpec) -> bool:
    """Use the cluster named by the spec or RAY_ADDRESS; otherwise start a local one.
    True when this call connected (and so the job should disconnect at its end)."""
    if ray.is_initialized():
        return False
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    ray.init(
        address="local",  # a new local Ray: never attach to whatever other Ray runs on this machine
        num_cpus=spec.ray.num_cpus or max(4, os.cpu_count() or 1),
        num_gpus=spec.ray.num_gpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        # workers import jobs/pipeline/modeling (and test families) like the driver does
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}},
    )
    return True


def check_job(spec: JobSpec):
    """Job-level checks; returns (family, stage specs)."""
    try:
        family = get_family(spec.family)
    except ValueError as e:
        raise SpecError(str(e)) from None
    stages = family.stages(spec.model)
    names = [s.name for s in stages]
    unknown = set(spec.stages) - set(names)
    if unknown:
        raise SpecError(f"stages: {', '.join(sorted(unknown))} not a stage of {family.name} (stages: {', '.join(names)})")
    if spec.stage(names[0]).colocate:
        raise SpecError(f"stages.{names[0]}.colocate: the first stage has no previous stage")
    for task, overrides in spec.sampler.items():
        if task not in TASKS or task not in family.tasks or not isinstance(overrides, dict):
            raise SpecError(f"sampler.{task}: expected one of {', '.join(sorted(family.tasks))} mapping to settings")
        try:
            family.params_for(task, overrides)
        except RowError as e:
            raise SpecError(f"sampler.{task}: {e}") from None
    return family, stages


def _groups(spec: JobSpec, stages):
    """Consecutive stages with `colocate` join the previous stage's actor."""
    groups = []
    for st in stages:
        cfg = spec.stage(st.name)
        gpus = cfg.num_gpus if cfg.num_gpus is not None else (1.0 if st.uses_gpu else 0.0)
        device = cfg.device or ("cuda" if gpus > 0 else "cpu")
        ctx = StageContext(model_path=spec.model, device=device, dtype=cfg.dtype or ("bfloat16" if device == "cuda" else "float32"), options=cfg.options)
        if cfg.colocate:
            groups[-1]["stages"].append((st.name, ctx))
        else:
            groups.append({"stages": [(st.name, ctx)], "cfg": cfg, "gpus": gpus, "batch": cfg.batch_size or st.default_batch_size})
    return groups


def check_resources(groups) -> None:
    """Fail fast, instead of waiting forever, when a stage needs GPUs the cluster lacks."""
    have = ray.cluster_resources().get("GPU", 0)
    for g in groups:
        need = g["gpus"] * (g["cfg"].replicas if isinstance(g["cfg"].replicas, int) else g["cfg"].replicas[0])
        if need > have:
            name = g["stages"][0][0]
            raise SpecError(f"stages.{name}: needs {need:g} GPU(s) for its replicas, the Ray cluster has {have:g}; "
                            f"set stages.{name}.num_gpus=0 to run it on CPU, or fewer replicas")


def _pool(replicas) -> ActorPoolStrategy:
    if isinstance(replicas, int):
        return ActorPoolStrategy(size=replicas)
    return ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1])


def build_dataset(spec: JobSpec, groups, manifest, plan, committed, sink_cfg: SinkConfig):
    ds = ray.data.read_datasource(ManifestDatasource(manifest))
    expand_kwargs = dict(family=spec.family, job_seed=spec.seed, sampler=spec.sampler, max_prompt_chars=spec.max_prompt_chars,
                         duplicates=plan.duplicates, committed=committed)
    ds = ds.map_batches(Expand, fn_constructor_kwargs=expand_kwargs, batch_format="pyarrow", compute=ActorPoolStrategy(size=1), num_cpus=0.25)
    for g in groups:
        ds = ds.map_batches(StageGroup, fn_constructor_kwargs={"family": spec.family, "stages": g["stages"]},
                            batch_size=g["batch"], batch_format="pyarrow", compute=_pool(g["cfg"].replicas),
                            num_gpus=g["gpus"] or None, num_cpus=g["cfg"].num_cpus)
    ds = ds.map_batches(encode_block, fn_kwargs={"image_format": spec.output_options.image_format, "quality": spec.output_options.quality},
                        batch_format="pyarrow", num_cpus=0.5)
    return ds, OutputDatasink(sink_cfg, spec.output_options.rows_per_shard)


def run_job(spec: JobSpec, *, new_run: bool = False, interactive: bool | None = None) -> dict:
    started = time.time()
    family, stages = check_job(spec)
    manifest = open_manifest(spec.manifest)
    plan = make_plan(manifest)
    groups = _groups(spec, stages)
    placement = {name: {"device": ctx.device, "dtype": ctx.dtype, "options": ctx.options} for g in groups for name, ctx in g["stages"]}
    fingerprint = spec.output_fingerprint(family.model_fingerprint(spec.model), placement)
    committed, commits = start_run(spec.output, fingerprint, manifest=spec.manifest, expected_pairs=plan.expected_pairs, new_run=new_run)
    log.info("manifest: %d rows in %d file(s), %d (id, sample) pairs expected, %d already committed",
             plan.num_rows, len(manifest.files), plan.expected_pairs, len(committed))
    sink_cfg = SinkConfig(output=spec.output, family=family.name, model=family.model_name(spec.model),
                          image_format=spec.output_options.image_format, webdataset=spec.output_options.webdataset,
                          extra_schema=pa.schema([manifest.schema.field(n) for n in manifest.extra_columns]))
    connected_here = connect(spec)
    try:
        return _execute(spec, groups, manifest, plan, committed, commits, sink_cfg, started, interactive)
    finally:
        if connected_here:
            # Stop Ray, and the worker and GCS logs it forwards, before the CLI prints its last line.
            ray.shutdown()


def _execute(spec, groups, manifest, plan, committed, commits, sink_cfg, started, interactive) -> dict:
    DataContext.get_current().enable_progress_bars = False  # genfleet shows its own progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    check_resources(groups)
    ds, sink = build_dataset(spec, groups, manifest, plan, committed, sink_cfg)

    watcher = CommitWatcher(spec.output, commits)
    progress = Progress(plan.expected_pairs, watcher.tally.pairs, interactive)
    stop = threading.Event()

    def watch():
        while not stop.wait(POLL_SECONDS):
            try:
                progress.update(watcher.poll())
            except Exception as e:  # noqa: BLE001 - progress must never kill the job
                log.debug("progress poll failed: %s", e)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    status = "failed"
    try:
        ds.write_datasink(sink)
        status = "completed"
    finally:
        stop.set()
        thread.join()
        tally = watcher.poll()  # the watcher has read every commit record once: no second pass
        progress.update(tally)
        progress.close()
        result = summary(tally, expected=plan.expected_pairs, started_at=started, committed_before=len(committed), status=status)
        write_summary(spec.output, result)
    return result
