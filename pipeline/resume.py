"""Resume: what an output already holds, and whether this job may continue it.

The commit records under OUTPUT/_commits/ are the log. Before anything starts the job
reads only their key and status columns (8 bytes a key in memory) and refuses to
continue an output written with settings that change the results. When the run
really starts (`begin_run`) it removes shard files that have no commit record (a
crash between a shard's files and its commit), optionally retires the permanent
errors so that they run again, and records the run in _job.json.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.keys import KeySet, pair_hashes
from pipeline.sink import COMMITS, DATASETS, STATS_KEY, ShardResult, _parquet_bytes
from pipeline.storage import filesystem, join, redact, write_atomic

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
RETIRED = "retired_errors"  # permanent errors set aside by --retry-errors (history)


class ResumeError(ValueError):
    """The output holds a different job; the message says what differs."""


class NoJob(ResumeError):
    """There is no genfleet job at the output."""


@dataclass(frozen=True)
class Commit:
    name: str
    result: ShardResult


@dataclass(frozen=True)
class CommitLog:
    """What the output's commit records hold."""

    commits: list[Commit]
    ok: KeySet
    errors: KeySet  # permanent errors
    retry: KeySet  # transient failures not made since

    def done(self, retry_errors: bool = False) -> KeySet:
        """The pairs a run skips: made, and (unless retried) permanently failed."""
        return self.ok if retry_errors else KeySet(np.concatenate([self.ok.hashes, self.errors.hashes]))


def shard_of(path: str) -> str:
    """The shard a file belongs to: `.../images/part-ab12.parquet` -> `part-ab12`."""
    return path.rsplit("/", 1)[-1].split(".", 1)[0]


def list_commits(output: str) -> list[str]:
    fs, root = filesystem(output)
    fs.invalidate_cache(join(root, COMMITS))  # listings are cached per filesystem instance
    try:
        return sorted(p for p in fs.ls(join(root, COMMITS), detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []


def _read(output: str, paths: list[str], columns: list[str]) -> list[tuple[str, ShardResult, pa.Table]]:
    if not paths:
        return []
    fs, _ = filesystem(output)
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    out = []
    for path in paths:
        f = pq.ParquetFile(io.BytesIO(blobs[path]))
        stats = json.loads(f.schema_arrow.metadata[STATS_KEY])
        out.append((path, ShardResult.from_stats(stats), f.read(columns=columns)))
    return out


def read_results(output: str, paths: list[str]) -> list[Commit]:
    """The stats of commit records (read concurrently on object stores: fs.cat batches)."""
    return [Commit(shard_of(p), r) for p, r, _ in _read(output, paths, [])]


def read_log(output: str) -> CommitLog:
    keys: dict[str, list[np.ndarray]] = {"ok": [], "error": [], "retry": []}
    commits = []
    for path, result, table in _read(output, list_commits(output), ["id", "sample_index", "status"]):
        commits.append(Commit(shard_of(path), result))
        hashes = pair_hashes(table.column("id").to_pylist(), table.column("sample_index").to_pylist())
        status = np.asarray(table.column("status").to_pylist(), dtype=object)
        for name in keys:
            keys[name].append(hashes[status == name])
    sets = {k: KeySet(np.concatenate(v) if v else np.zeros(0, np.uint64)) for k, v in keys.items()}
    done = np.concatenate([sets["ok"].hashes, sets["error"].hashes])
    retry = sets["retry"].hashes[~KeySet(done).contains(sets["retry"].hashes)] if len(done) else sets["retry"].hashes
    return CommitLog(commits, sets["ok"], sets["error"], KeySet(retry))


def read_job(output: str) -> dict | None:
    fs, root = filesystem(output)
    try:
        return json.loads(fs.cat_file(join(root, JOB_FILE)))
    except FileNotFoundError:
        return None


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return diffs


def check_output(output: str, fingerprint: dict, *, new_run: bool) -> CommitLog:
    """Read-only: may this job continue OUTPUT? Returns what it holds (nothing for a new run)."""
    job = read_job(output)
    if job is not None and job["fingerprint"] != fingerprint and not new_run:
        diffs = "; ".join(_differences(job["fingerprint"], fingerprint))
        raise ResumeError(f"output already holds a job with other settings ({diffs}); "
                          "use another output, or pass --new-run to discard it and start over")
    if new_run:
        empty = KeySet(np.zeros(0, np.uint64))
        return CommitLog([], empty, empty, empty)
    return read_log(output)


def wipe(output: str) -> None:
    fs, root = filesystem(output)
    for name in (*DATASETS, COMMITS, RETIRED):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name), recursive=True)
    for name in (JOB_FILE, SUMMARY_FILE):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name))


def remove_debris(output: str, commits: list[Commit]) -> list[str]:
    """Delete shard files without a commit record, stray temp files (of shards, commit
    records, _job.json and _summary.json), and errors files of shards whose errors were
    retired (a --retry-errors run stopped midway)."""
    fs, root = filesystem(output)
    by_name = {c.name: c.result for c in commits}
    removed = []
    for where in (root, join(root, COMMITS)):  # a crash mid-write of _job.json, _summary.json or a commit record
        fs.invalidate_cache(where)
        try:
            strays = [p for p in fs.ls(where, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
        except FileNotFoundError:
            strays = []
        for p in strays:
            fs.rm(p)
            removed.append(p)
    for dataset in DATASETS:
        fs.invalidate_cache(join(root, dataset))
        try:
            paths = fs.ls(join(root, dataset), detail=False)
        except FileNotFoundError:
            continue
        for p in paths:
            result = by_name.get(shard_of(p))
            if ".tmp-" in p or result is None or (dataset == "errors" and result.errors == 0):
                fs.rm(p)
                removed.append(p)
    return removed


def retire_errors(output: str, commits: list[Commit]) -> list[Commit]:
    """--retry-errors: set each shard's permanent errors aside so that they run again.
    Per shard: copy errors/ to retired_errors/, rewrite the commit record with those keys
    as `retired` (not done), then drop errors/ (each step safe to repeat after a crash)."""
    fs, root = filesystem(output)
    out = []
    for c in commits:
        if c.result.errors == 0:
            out.append(c)
            continue
        src = join(root, "errors", f"{c.name}.parquet")
        if fs.exists(src):
            write_atomic(fs, join(root, RETIRED, f"{c.name}.parquet"), fs.cat_file(src))
        path = join(root, COMMITS, f"{c.name}.parquet")
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        status = ["retired" if s == "error" else s for s in table.column("status").to_pylist()]
        covers = table.column("covers").to_pylist() if "covers" in table.column_names else [1] * table.num_rows
        result = replace(c.result, errors=0, errors_by_kind={},
                         pairs=sum(n for s, n in zip(status, covers) if s in ("ok", "error")))
        table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
        write_atomic(fs, path, _parquet_bytes(table.replace_schema_metadata({}), {STATS_KEY: json.dumps(asdict(result)).encode()}))
        if fs.exists(src):
            fs.rm(src)
        out.append(Commit(c.name, result))
    return out


def begin_run(output: str, fingerprint: dict, *, manifest: str, expected_pairs: int, new_run: bool,
              retry_errors: bool, log: CommitLog) -> list[Commit]:
    """The run really starts: clean the output, record the run. Returns the commits so far."""
    job = read_job(output)
    if new_run:
        wipe(output)
        job = None
    elif job is not None and job["fingerprint"] != fingerprint:  # taken by another job since the check
        raise ResumeError("output was taken by a job with other settings while this one started")
    commits = log.commits
    remove_debris(output, commits)
    if retry_errors:
        commits = retire_errors(output, commits)
    before = sum(c.result.pairs for c in commits)
    runs = (job or {}).get("runs", []) + [{"started_at": time.time(), "committed_before": before, "retry_errors": retry_errors}]
    record = {"fingerprint": fingerprint, "manifest": redact(manifest), "expected_pairs": expected_pairs, "runs": runs}
    fs, root = filesystem(output)
    write_atomic(fs, join(root, JOB_FILE), json.dumps(record, indent=1, default=str).encode())
    if fs.exists(join(root, SUMMARY_FILE)):  # a summary describes a finished run only
        fs.rm_file(join(root, SUMMARY_FILE))
    return commits
