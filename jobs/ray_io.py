"""Ray Data adapters: the manifest as a Datasource, the output as a Datasink.

The reading and writing themselves live in pipeline/ (no Ray there); these classes
only cut the work into Ray tasks and run the sink's lifecycle:
    on_write_start     the run really starts: debris removed, errors retired, _job.json, README.md,
                       its record in _runs/ (running)
    write              one shard and its commit record -> ShardResult
    on_write_complete  _summary.json from the earlier commits and this run's results, its record ended
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask, WriteResult

from pipeline.card import write_card
from pipeline.changes import Changes
from pipeline.gcpause import gc_paused
from pipeline.manifest import Manifest, ManifestFile, read_file_rows
from pipeline.plan import Plan, save_cache
from pipeline.report import Tally, finish_run, summary
from pipeline.resume import CommitLog, begin_run, read_log, write_index
from pipeline.rows import concat_blocks
from pipeline.runs import RunEntry, write_run
from pipeline.sink import ShardResult, SinkConfig, write_shard
from pipeline.validate import ExpandConfig, expand_block

READ_TASK_ROWS = 50_000


class ManifestDatasource(Datasource):
    """Read tasks over runs of row groups with work left, streamed in batches with row
    ordinals and validated in the same task (pipeline/validate.py): reading and validation
    run in as many tasks at once as there are CPUs for them, and never in a stage's actor,
    as a map step after the read can end up (Ray fuses it into the next actor pool when
    their resources match). `skip`: file identity -> its row groups with nothing left to do
    (not read). `validation`: the job's ExpandConfig in the object store (put there once: its
    key set can hold 10^7 keys; each task fetches it, and the Expand it makes is kept per
    worker and job), or None to read the raw rows (with their ordinals)."""

    def __init__(self, manifest: Manifest, skip: dict[str, frozenset[int]] | None = None, validation: ray.ObjectRef | None = None):
        super().__init__()
        self.manifest, self.skip, self.validation = manifest, skip or {}, validation

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        mapping = self.manifest.columns  # each task reads under the runner's column names
        validation = self.validation

        def read(url: str, f: ManifestFile, skip: frozenset[int]):
            def rows():
                tables = read_file_rows(url, f, skip_groups=skip, mapping=mapping)
                if validation is None:
                    yield from tables
                    return
                config: ExpandConfig = ray.get(validation)
                for table in tables:
                    yield expand_block(table, config=config)

            return rows

        tasks = []
        for f in self.manifest.files:
            done = self.skip.get(f.identity, frozenset())
            # a task per run of row groups of about READ_TASK_ROWS rows, so that reading and validation run in parallel
            spans: list[list[int]] = [[]]
            for g, n in enumerate(f.row_groups):
                if g in done:
                    continue
                if spans[-1] and sum(f.row_groups[i] for i in spans[-1]) + n > READ_TASK_ROWS:
                    spans.append([])
                spans[-1].append(g)
            for span in filter(None, spans):
                skip = frozenset(range(len(f.row_groups))) - set(span)
                tasks.append(ReadTask(read(self.manifest.url_of(f), f, skip),
                                      BlockMetadata(num_rows=sum(f.row_groups[g] for g in span), size_bytes=None, exec_stats=None,
                                                    input_files=(f.path,))))
        # every row group done but the run still has work (pairs it can only find by id): one empty task
        return tasks or [ReadTask(lambda: iter(()), BlockMetadata(num_rows=0, size_bytes=None, exec_stats=None, input_files=()))]

    def get_name(self) -> str:
        return "Manifest"


@dataclass(frozen=True)
class RunRecord:
    """What the run records when it starts, and what its summary compares against."""

    fingerprint: dict
    manifest: str
    expected_pairs: int
    new_run: bool
    retry_errors: bool
    log: CommitLog
    started_at: float
    plan: Plan | None = None  # its newly read files are cached when the run starts
    entry: RunEntry | None = None  # its record in _runs/, written when it starts
    changes: Changes = Changes()  # rows edited since their pairs were committed: in the summary


class OutputDatasink(Datasink[ShardResult | None]):
    """Each write commits one shard. The driver bundles the rows (jobs/writer.py)."""

    def __init__(self, cfg: SinkConfig, run: RunRecord | None):
        self.cfg, self.run = cfg, run
        self.before = Tally()  # the commits of earlier runs, once started
        self.entry: RunEntry | None = None  # this run's record in _runs/, once started
        self.result: dict | None = None  # the summary, once complete

    def __getstate__(self) -> dict:
        # write tasks need only where and how to write, not the run's commit log
        return {"cfg": self.cfg, "run": None, "before": None, "entry": None, "result": None}

    def on_write_start(self, schema=None) -> None:
        r = self.run
        assert r is not None, "on_write_start runs on the driver"
        commits = begin_run(self.cfg.output, r.fingerprint, manifest=r.manifest, expected_pairs=r.expected_pairs,
                            new_run=r.new_run, retry_errors=r.retry_errors, log=r.log)
        write_card(self.cfg.output, self.cfg.family, self.cfg.model)  # the output opens in `datasets` while it grows
        self.before = Tally.of(c.result for c in commits)
        if r.entry is not None:
            self.entry = r.entry.begun(self.before.pairs)
            write_run(self.cfg.output, self.entry)
        if r.plan is not None:
            save_cache(self.cfg.output, r.plan)

    def write(self, blocks, ctx) -> ShardResult | None:
        with gc_paused():
            return write_shard(concat_blocks(pa.table(b) if isinstance(b, dict) else b for b in blocks), self.cfg)

    def on_write_complete(self, write_result: WriteResult[ShardResult | None]) -> None:
        assert self.run is not None, "on_write_complete runs on the driver"
        this_run = Tally.of(r for r in write_result.write_returns if r is not None)
        data = summary(self.before, this_run, expected=self.run.expected_pairs, started_at=self.run.started_at, status="completed",
                       model_fingerprint=self.run.fingerprint["model"], changes=self.run.changes)
        if data["missing"]:
            data["status"] = "incomplete"
        finish_run(self.cfg.output, data, self.entry, this_run)
        write_index(self.cfg.output, read_log(self.cfg.output))  # the next start reads one file, not one per shard
        self.result = data

    def on_write_failed(self, error: Exception) -> None:
        """The driver writes the failed run's summary (it holds the results so far)."""
        self.result = None

    def get_name(self) -> str:
        return "GenfleetOutput"
