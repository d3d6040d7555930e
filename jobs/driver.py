"""The driver: manifest -> validation -> family stages -> encode -> sink -> report.

Everything that can fail for the whole job (spec, model layout, manifest, a changed
output) fails in `prepare`, before Ray starts and before any model loads; nothing is
written then. A run with nothing left to do ends there too. Otherwise one Ray Data
streaming pipeline runs: the manifest is read and validated in batches in its read
tasks, each model stage is an actor pool that keeps its model resident, the other CPU
work (fetching, encoding) runs in plain tasks, and the driver commits shards by size or
age (jobs/writer.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext

from jobs.nodes import check_cluster
from jobs.progress import BoardReporter, BoardWatcher
from jobs.ray_io import ManifestDatasource, OutputDatasink, RunRecord
from jobs.resources import TASK_CPUS, Node, Pool, check_placement, cluster_nodes, local_cpus, local_nodes
from jobs.writer import ShardWriter
from pipeline.card import write_card
from pipeline.changes import Changes, changed_rows
from pipeline.display import Progress, ProgressState
from pipeline.encode import encode_block
from pipeline.families import get_family
from pipeline.family import Family, ModelError, StageContext, StageSpec, parse_params
from pipeline.guard import ErrorRateGuard
from pipeline.inputs import fetch_block
from pipeline.keys import KeySet
from pipeline.lease import Heartbeat, acquire
from pipeline.manifest import Manifest, open_manifest, output_names
from pipeline.outcome import JobIncomplete, JobStopped
from pipeline.plan import Plan, make_plan, save_cache
from pipeline.policy import FetchPolicy
from pipeline.report import Tally, finish_run, summary
from pipeline.report_html import write_report_after_run
from pipeline.resume import CommitLog, check_output, write_index
from pipeline.runs import RunEntry, start_entry
from pipeline.sample import RowError
from pipeline.scoring import STAGE as SCORE_STAGE
from pipeline.scoring import ScoreStage, check_scores, score_columns, score_context
from pipeline.sink import OUTPUT_COLUMNS, SinkConfig
from pipeline.spec import JobSpec, SpecError, StageConfig
from pipeline.stages import StageGroup, run_in_task
from pipeline.storage import redact
from pipeline.validate import ExpandConfig, check_first_rows, end_of_first_pending

log = logging.getLogger("genfleet")


@dataclass(frozen=True)
class GroupPlan:
    """One actor pool: a stage and the stages co-located with it (name, context, keep_inputs);
    or, `in_tasks`, stages that keep no model, run inside the job's CPU tasks (StageSpec.resident)."""

    stages: list[tuple[str, StageContext, bool]]
    cfg: StageConfig
    num_gpus: float
    num_cpus: float
    batch_size: int
    in_tasks: bool = False

    @property
    def name(self) -> str:
        return self.stages[0][0]

    @property
    def replicas(self) -> int | tuple[int, int]:
        return 1 if self.cfg.replicas is None else self.cfg.replicas

    @property
    def min_replicas(self) -> int:
        return self.replicas if isinstance(self.replicas, int) else self.replicas[0]


@dataclass(frozen=True)
class Job:
    """A job that passed every check, ready to run."""

    spec: JobSpec
    family: Family
    groups: list[GroupPlan]
    manifest: Manifest
    plan: Plan
    log: CommitLog
    fingerprint: dict
    sink: SinkConfig
    extras: dict[str, str]  # manifest column -> output column
    skip: dict[str, frozenset[int]]  # manifest file identity -> row groups with nothing left to do
    score: GroupPlan | None = None  # the job's score stage (scores: in the spec), after the family's last
    end_ordinal: int | None = None  # --limit: rows from this manifest ordinal on are left for a later run
    changes: Changes = Changes()  # rows edited since their pairs were committed (reported, not made again)


LOCAL_RAY_RECORDS = Path(tempfile.gettempdir()) / "genfleet-local-ray"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _ray_processes_of_group(pgid: int) -> list[int]:
    """Ray's processes (its daemons, agents and workers) in process group `pgid`, from /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            group = int(stat.rsplit(")", 1)[1].split()[2])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if group == pgid and (cmdline.startswith(b"ray::") or b"/ray/" in cmdline):
            found.append(int(entry.name))
    return found


def reap_orphaned_ray() -> list[int]:
    """Kill what is left of local Rays whose driver died without stopping them (SIGKILL):
    Ray's own processes in the dead driver's process group (agents, workers finishing a
    task), so that a dead driver's Ray cannot keep working. Returns the pids killed."""
    killed = []
    for record in LOCAL_RAY_RECORDS.glob("*.json"):
        try:
            info = json.loads(record.read_text())
            driver, pgid = int(info["driver"]), int(info["pgid"])
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _alive(driver):
            continue
        # only a driver that led its own process group (a shell job, a new session): a shared
        # group could hold someone else's Ray
        for pid in _ray_processes_of_group(pgid) if pgid == driver else ():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        record.unlink(missing_ok=True)
    return killed

IDLE_WORKER_KEEP_MS = 10 * 60 * 1000


def _record_local_ray() -> None:
    """Remember this driver's process group: Ray's processes inherit it."""
    LOCAL_RAY_RECORDS.mkdir(parents=True, exist_ok=True)
    (LOCAL_RAY_RECORDS / f"{os.getpid()}.json").write_text(json.dumps({"driver": os.getpid(), "pgid": os.getpgid(0)}))


def connect(spec: JobSpec, *, num_cpus: int, log_to_driver: bool = True) -> bool:
    """Use the cluster named by the spec or RAY_ADDRESS; otherwise start a local one of
    `num_cpus` (resources.local_cpus).
    True when this call connected (and so the job should disconnect at its end).
    `log_to_driver=False` keeps Ray's workers' output off this terminal (a live bar)."""
    if ray.is_initialized():
        return False
    address = _ray_address(spec)
    if address:
        _ray_logs(ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver), log_to_driver)
        return True
    reap_orphaned_ray()
    context = ray.init(
        address="local",  # a new local Ray: never attach to whatever other Ray runs on this machine
        num_cpus=num_cpus,
        num_gpus=spec.ray.num_gpus,  # type: ignore[arg-type]  # Ray accepts fractions of declared GPUs
        include_dashboard=False,
        logging_level=logging.WARNING,
        # Ray stops a worker left idle for a second once more are idle than there are CPUs; the
        # job's many small CPU tasks (validation, encoding, writes) would start and stop a
        # worker, each a second or two of imports, dozens of times a run: keep them for the run
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
        # workers import jobs/pipeline/modeling (and test families) like the driver does
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}},
        log_to_driver=log_to_driver,
    )
    _record_local_ray()
    _ray_logs(context, log_to_driver)
    return True


def _ray_logs(context, log_to_driver: bool) -> None:
    if not log_to_driver:
        where = os.path.join(context.address_info.get("session_dir") or "the Ray session directory", "logs")
        log.info("Ray's own output (its workers' lines) goes to its log files, not to this terminal: %s", where)


def disconnect() -> None:
    """Stop the local Ray this driver started (and forget its record)."""
    ray.shutdown()
    (LOCAL_RAY_RECORDS / f"{os.getpid()}.json").unlink(missing_ok=True)


def _check_family(spec: JobSpec) -> tuple[Family, list[StageSpec]]:
    family = get_family(spec.family)
    family.check_model(spec.model)
    try:
        stages = family.stages(spec.model)
    except (OSError, ValueError) as e:
        raise ModelError(f"model {spec.model}: {e}") from None
    names = [s.name for s in stages]
    unknown = set(spec.stages) - set(names)
    if unknown:
        raise SpecError(f"stages: {', '.join(sorted(unknown))} not a stage of {family.name} (stages: {', '.join(names)})")
    if spec.stage(names[0]).colocate:
        raise SpecError(f"stages.{names[0]}.colocate: the first stage has no previous stage")
    for task, overrides in spec.sampler.items():
        if task not in family.tasks or not isinstance(overrides, dict):
            raise SpecError(f"sampler.{task}: expected one of {', '.join(sorted(family.tasks))} mapping to settings")
        try:
            parse_params(family.tasks[task].params, overrides, prefix=f"sampler.{task}")
        except RowError as e:
            raise SpecError(str(e)) from None
    return family, stages


def plan_groups(spec: JobSpec, stages: list[StageSpec]) -> list[GroupPlan]:
    """Consecutive stages with `colocate` join the previous stage's actor (and its device)."""
    last_reader = max((i for i, s in enumerate(stages) if s.reads_inputs), default=-1)
    groups: list[GroupPlan] = []
    for i, st in enumerate(stages):
        cfg = spec.stage(st.name)
        keep = i < last_reader
        if cfg.colocate:
            host = groups[-1]
            device = cfg.device or host.stages[0][1].device
            if device == "cuda" and host.num_gpus == 0:
                raise SpecError(f"stages.{st.name}: device cuda, but it is co-located with {host.name}, which has no GPU; "
                                f"leave stages.{st.name}.device unset to run on its host's device")
            ctx = StageContext(spec.model, device, cfg.dtype or ("bfloat16" if device == "cuda" else "float32"), cfg.options)
            host.stages.append((st.name, ctx, keep))
            if st.resident and host.in_tasks:  # a model joins: the group keeps it loaded in an actor
                groups[-1] = dataclasses.replace(host, in_tasks=False)
            continue
        gpus = cfg.num_gpus if cfg.num_gpus is not None else st.num_gpus
        device = cfg.device or ("cuda" if gpus > 0 else "cpu")
        ctx = StageContext(spec.model, device, cfg.dtype or ("bfloat16" if device == "cuda" else "float32"), cfg.options)
        groups.append(GroupPlan([(st.name, ctx, keep)], cfg, gpus, cfg.num_cpus if cfg.num_cpus is not None else st.num_cpus,
                                 cfg.batch_size or st.batch_size, in_tasks=not st.resident and gpus == 0 and cfg.replicas is None))
    return groups


def prepare(spec: JobSpec, *, new_run: bool = False) -> Job:
    """Every job-level check; reads but writes nothing, starts nothing."""
    family, stages = _check_family(spec)
    scores = check_scores(spec, family, [s.name for s in stages])  # the scorer's model, before Ray as the family's
    inputs = {inp.name: inp.many for t in family.tasks.values() for inp in t.inputs}
    manifest = open_manifest(spec.manifest.path, inputs, spec.manifest.columns)
    extras = output_names(manifest.extra_columns, set(OUTPUT_COLUMNS) | set(family.scores) | set(score_columns(spec)))
    plan = make_plan(manifest, None if new_run else spec.output)
    groups = plan_groups(spec, stages)
    placement = {name: {"device": ctx.device, "dtype": ctx.dtype, "options": ctx.options} for g in groups for name, ctx, _ in g.stages}
    fingerprint = spec.output_fingerprint(family.model_fingerprint(spec.model), placement, scores)
    commit_log = check_output(spec.output, fingerprint, new_run=new_run, manifest=(spec.manifest.path, {f.identity for f in manifest.files}))
    if not commit_log.commits:  # before the first commit: a manifest whose rows all fail alike stops here, not as errors
        check_first_rows(manifest, spec, plan.duplicates)
    sink = SinkConfig(output=spec.output, family=family.name, model=family.model_name(spec.model),
                      image_format=spec.output_options.image_format, webdataset=spec.output_options.webdataset,
                      extra_schema=pa.schema([pa.field(extras[n], manifest.schema.field(n).type) for n in manifest.extra_columns]),
                      scores={**family.scores, **score_columns(spec)}, files=tuple((f.identity, f.first_ordinal) for f in manifest.files))
    c = spec.scores.clip
    score = GroupPlan([(SCORE_STAGE, score_context(c), False)], StageConfig(replicas=c.replicas), c.num_gpus, c.num_cpus,
                      c.batch_size) if c else None
    return Job(spec, family, groups, manifest, plan, commit_log, fingerprint, sink, extras, {}, score)


def _skip_groups(job: Job, retry_errors: bool) -> dict[str, frozenset[int]]:
    return {f.identity: job.log.complete_groups(f.identity, job.plan.group_pairs[f.identity], f.group_starts(), retry_errors)
            for f in job.manifest.files}


def _changes(job: Job, skip: dict[str, frozenset[int]], retry_errors: bool) -> Changes:
    """Rows edited in place since their pairs were committed, among the row groups not in `skip`."""
    changes = changed_rows(job.manifest, skip, job.plan.duplicates, job.log.table, retry_errors)
    if changes.rows:
        log.warning("%d rows changed since they were made (e.g. id %s); they are not made again: give them new ids, or --new-run",
                    changes.rows, changes.examples[0])
    return changes


def _groups(job: Job) -> list[GroupPlan]:
    return job.groups + ([job.score] if job.score else [])


def _pools(job: Job) -> list[Pool]:
    return [Pool(g.name, g.num_gpus, g.num_cpus, g.min_replicas) for g in _groups(job) if not g.in_tasks]


def _ray_address(spec: JobSpec) -> str | None:
    return spec.ray.address or os.environ.get("RAY_ADDRESS")


def check_fits_before_start(job: Job) -> tuple[Node, str] | None:
    """A local start: will the Ray it starts hold every stage? Asked before starting it.
    Returns that Ray's node and why it has its GPUs; None when the job joins a running Ray."""
    if ray.is_initialized() or _ray_address(job.spec):
        return None
    pools = _pools(job)
    nodes, why = local_nodes(job.spec, pools)
    check_placement(pools, nodes, f"the local Ray ({why})")
    return nodes[0], why


def check_fits(job: Job) -> None:
    """Against the Ray this driver is connected to, node by node; several nodes: shared storage, a model each reads."""
    nodes = ray.nodes()
    check_placement(_pools(job), cluster_nodes(nodes), "the Ray cluster" if _ray_address(job.spec) else "the local Ray")
    check_cluster(job.spec, nodes)


def _pool(replicas) -> ActorPoolStrategy:
    if isinstance(replicas, int):
        return ActorPoolStrategy(size=replicas)
    return ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1])


def build_dataset(job: Job, done, report: BoardReporter | None = None):
    """`report`: where the model stages count their samples (jobs/progress.py), or nowhere."""
    spec = job.spec
    expand = ExpandConfig(family=spec.family, job_seed=spec.seed, sampler=spec.sampler, max_prompt_chars=spec.max_prompt_chars,
                          duplicates=job.plan.duplicates, committed=done, extras=job.extras, end_ordinal=job.end_ordinal)
    source = ManifestDatasource(job.manifest, job.skip, ray.put(expand))
    # as many blocks as read tasks: Ray Data would otherwise split each task's output, and a split
    # read fuses with nothing (a first stage in tasks then runs apart from reading)
    fused = bool(job.groups) and job.groups[0].in_tasks
    ds = ray.data.read_datasource(source, override_num_blocks=len(source.get_read_tasks(1)) if fused else None)
    if any(t.inputs for t in job.family.tasks.values()):
        i = spec.inputs
        policy = FetchPolicy.for_manifest(spec.manifest.path, allow_local=i.allow_local, allow_urls=i.allow_urls,
                                          max_bytes=i.max_bytes, max_pixels=i.max_pixels)
        ds = ds.map_batches(fetch_block, fn_kwargs={"policy": policy}, batch_format="pyarrow", num_cpus=TASK_CPUS)
    for g in job.groups:
        if g.in_tasks:
            ds = ds.map_batches(run_in_task, fn_kwargs={"family": spec.family, "stages": g.stages, "batch_size": g.batch_size,
                                                        "attempts": spec.errors.attempts, "report": report},
                                batch_size=None, batch_format="pyarrow", num_cpus=TASK_CPUS)
            continue
        ds = ds.map_batches(StageGroup, fn_constructor_kwargs={"family": spec.family, "stages": g.stages, "attempts": spec.errors.attempts,
                                                               "report": report},
                            batch_size=g.batch_size, batch_format="pyarrow", compute=_pool(g.replicas),
                            num_gpus=g.num_gpus or None, num_cpus=g.num_cpus)
    if (sc := job.score) is not None:  # scores on the decoded pixels, before encoding (pipeline/scoring.py)
        ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"ctx": sc.stages[0][1], "attempts": spec.errors.attempts, "report": report},
                            batch_size=sc.batch_size, batch_format="pyarrow", compute=_pool(sc.replicas),
                            num_gpus=sc.num_gpus or None, num_cpus=sc.num_cpus)
    return ds.map_batches(encode_block, fn_kwargs={"image_format": spec.output_options.image_format, "quality": spec.output_options.quality},
                          batch_format="pyarrow", num_cpus=TASK_CPUS)


def _limited(job: Job, limit: int, done: KeySet) -> Job:
    """Only the first `limit` rows with work left (`done`: the pairs this run skips): the rest of the manifest is not read."""
    end = end_of_first_pending(job.manifest, job.skip, job.plan.duplicates, done, limit)
    if end is None:  # fewer rows than that are left: the whole run
        return job
    skip = {f.identity: job.skip.get(f.identity, frozenset()) | {g for g, first in enumerate(f.first_ordinal + f.group_starts()) if first >= end}
            for f in job.manifest.files}
    return dataclasses.replace(job, end_ordinal=end, skip=skip)


def _nothing_to_do(job: Job, before: Tally, new_run: bool, retry_errors: bool) -> bool:
    return (not new_run and not len(job.log.retry) and before.pairs >= job.plan.expected_pairs
            and not (retry_errors and before.errors))


def dry_run(spec: JobSpec, *, new_run: bool = False, retry_errors: bool = False) -> dict:
    """--dry-run: every check a run makes before Ray (spec, model, manifest, output, whether
    the stages fit a local Ray) and the plan, without starting Ray or loading a model."""
    job = prepare(spec, new_run=new_run)
    before = Tally.of(c.result for c in job.log.commits)
    local = check_fits_before_start(job)
    if local is None:
        fits = f"not checked before the run: the Ray at {redact(_ray_address(spec) or 'this process')} is checked when the run connects"
    else:
        node, why = local
        fits = f"every stage fits the local Ray ({node.cpus:g} CPUs, {node.gpus:g} GPUs: {why})"
    redo = before.errors if retry_errors else 0
    return {
        "family": job.family.name,
        "model": redact(spec.model),
        "manifest": f"{redact(job.manifest.url)}: {len(job.manifest.files)} file(s), {job.plan.num_rows} rows, "
                    f"{len(job.plan.duplicates)} duplicate id(s)",
        "expected_pairs": job.plan.expected_pairs,
        "committed_pairs": before.pairs,
        "pairs_to_run": 0 if _nothing_to_do(job, before, new_run, retry_errors) else max(job.plan.expected_pairs - before.pairs + redo, 0)
        + len(job.log.retry),
        "stages": {" + ".join(n for n, _, _ in g.stages): ("in the job's CPU tasks" if g.in_tasks else
                                                           f"{g.replicas} replica(s) x {g.num_gpus:g} GPU / {g.num_cpus:g} CPU")
                   + f", batch {g.batch_size}, {g.stages[0][1].device} {g.stages[0][1].dtype}" for g in _groups(job)},
        "resources": fits,
    }


def run_job(spec: JobSpec, *, new_run: bool = False, retry_errors: bool = False, takeover: bool = False,
            interactive: bool | None = None, limit: int | None = None,
            on_progress: Callable[[ProgressState], None] | None = None) -> dict:
    """Run the job to its end. `limit`: only the first `limit` rows with work left (a smoke
    run; the same command without it completes the output). `on_progress`: sees each state of
    the live display (phase, per-stage counts, commits)."""
    started = time.time()
    job = prepare(spec, new_run=new_run)
    before = Tally.of(c.result for c in job.log.commits)
    log.info("manifest: %d rows in %d file(s), %d (id, sample) pairs expected, %d already committed",
             job.plan.num_rows, len(job.manifest.files), job.plan.expected_pairs, before.pairs)
    entry = start_entry(started, manifest=job.manifest, plan=job.plan, retry_errors=retry_errors)
    if _nothing_to_do(job, before, new_run, retry_errors):
        # nothing is read, but a file the log has not seen (new, or rewritten since) would be read by a run: compared
        seen = job.log.files()
        changes = _changes(job, {f.identity: frozenset(range(len(f.row_groups))) for f in job.manifest.files if f.identity in seen},
                           retry_errors)
        result = summary(before, Tally(), expected=job.plan.expected_pairs, started_at=started, status="completed",
                         model_fingerprint=job.fingerprint["model"], changes=changes)
        finish_run(spec.output, result, entry.begun(before.pairs), Tally())  # nothing to do: no Ray, no model; a run all the same
        save_cache(spec.output, job.plan)
        write_index(spec.output, job.log)
        write_card(spec.output, job.sink.family, job.sink.model)  # (an output of a version that wrote none)
        write_report_after_run(spec.output)
        return result
    check_fits_before_start(job)
    job = dataclasses.replace(job, skip={} if new_run else _skip_groups(job, retry_errors))
    job = dataclasses.replace(job, changes=_changes(job, job.skip, retry_errors))
    done = job.log.done(retry_errors)  # the pairs this run skips (a sorted key set: built once, 10^7 keys take a second)
    if limit is not None:
        job = _limited(job, limit, done)
    lease = acquire(spec.output, takeover=takeover)  # one writer per OUTPUT, before anything starts
    job = dataclasses.replace(job, sink=dataclasses.replace(job.sink, lease_owner=lease.owner))
    with Heartbeat(spec.output, lease) as heartbeat:
        # the bar starts at the pairs this run skips (--retry-errors makes the errors again)
        progress = Progress(job.plan.expected_pairs, len(done), interactive, on_state=on_progress)
        connected_here = False
        try:
            progress.phase("starting Ray")
            # Ray's worker lines (and its own, printed from other threads and processes) would tear
            # a live bar apart; rich can move only this process's Python writes above it, so on a
            # terminal they go to Ray's log files only, and errors still reach genfleet as exceptions.
            connected_here = connect(spec, num_cpus=local_cpus(spec, _pools(job)), log_to_driver=not progress.interactive)
            return _execute(job, done, new_run, retry_errors, started, progress, heartbeat, entry)
        finally:
            progress.close()
            if connected_here:
                # Stop Ray, and the worker and GCS logs it forwards, before the CLI prints its last line.
                disconnect()


def _execute(job: Job, done: KeySet, new_run: bool, retry_errors: bool, started: float, progress: Progress, heartbeat: Heartbeat,
             entry: RunEntry) -> dict:
    spec = job.spec
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # genfleet shows its own progress
    ctx.execution_options.preserve_order = True  # same manifest, same batches: the same bytes
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    check_fits(job)
    stages = [name for g in _groups(job) for name, _, _ in g.stages]
    todo = max(job.plan.expected_pairs - len(done), 0)  # the pairs through the stages this run
    watcher = BoardWatcher(stages, todo, progress.stages)
    ds = build_dataset(job, done, watcher.reporter)
    run = RunRecord(job.fingerprint, spec.manifest.path, job.plan.expected_pairs, new_run, retry_errors, job.log, started, job.plan,
                    entry, job.changes)
    sink = OutputDatasink(job.sink, run)
    guard = ErrorRateGuard(spec.errors.max_rate, spec.errors.window)
    this_run = Tally()

    def on_result(r) -> str | None:
        this_run.add(r)
        guard.add(r)
        progress.committed(sink.before.pairs + this_run.pairs, sink.before.errors + this_run.errors + this_run.retryable)
        return str(heartbeat.lost) if heartbeat.lost else guard.check()

    writer = ShardWriter(sink, rows_per_shard=spec.output_options.rows_per_shard,
                         max_shard_seconds=spec.output_options.max_shard_seconds, on_result=on_result)
    try:
        with watcher:
            writer.run(ds)
            watcher.passed(writer.received)
    except BaseException as e:
        # Ctrl-C is the user's choice, not a failure of the job: the same command resumes it
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped" if isinstance(e, JobStopped) else "failed"
        # (sink.entry is None when the run failed before it really started: then it has no record)
        finish_run(spec.output, summary(sink.before, this_run, expected=job.plan.expected_pairs, started_at=started, status=status,
                                        model_fingerprint=job.fingerprint["model"], changes=job.changes), sink.entry, this_run)
        raise
    finally:
        progress.close()  # (run_job closes it too, when the run ends before it gets here)
        write_report_after_run(spec.output)  # completed, incomplete, stopped or failed: after the summary
    result = sink.result
    assert result is not None
    if result["missing"] and job.end_ordinal is not None:  # --limit: what is left waits for the next run
        return {**result, "limited_to_rows_before": job.end_ordinal}
    if result["missing"]:
        retry = f"; {result['retryable']} failed transiently" if result["retryable"] else ""
        raise JobIncomplete(f"{result['missing']} of {result['expected']} (id, sample) pairs were not committed{retry}: "
                            "run the same command again to make them")
    return result
