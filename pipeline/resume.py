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
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.keys import KeySet, pair_hashes
from pipeline.sink import COMMITS, DATASETS, STATS_KEY, ShardResult, _parquet_bytes
from pipeline.storage import filesystem, join, redact, write_atomic

JOB_FILE = "_job.json"
INDEX_FILE = "_commits.index.parquet"  # the commit records folded into one file (a cache of _commits/)
SUMMARY_FILE = "_summary.json"
RUNS_DIR = "_runs"  # the run history: a record per run (pipeline/runs.py)
RETIRED = "retired_errors"  # permanent errors set aside by --retry-errors (history)


class ResumeError(ValueError):
    """The output holds a different job; the message says what differs."""


class NoJob(ResumeError):
    """There is no genfleet job at the output."""


@dataclass(frozen=True)
class Commit:
    name: str
    result: ShardResult


# the log as one table, a row per committed sample: what resume needs of each (the strings
# dictionary-encoded: 10^7 pairs stay well under a gigabyte). `content`: the row's content
# hash (keys.content_hashes), null in records of versions before it
_TEXT = pa.dictionary(pa.int32(), pa.string())
LOG_SCHEMA = pa.schema([("shard", _TEXT), ("key", pa.uint64()), ("status", _TEXT), ("covers", pa.int32()),
                        ("file", _TEXT), ("row", pa.int64()), ("content", pa.uint64())])


@dataclass(frozen=True)
class CommitLog:
    """What the output's commit records hold."""

    commits: list[Commit]
    ok: KeySet
    errors: KeySet  # permanent errors
    retry: KeySet  # transient failures not made since
    table: pa.Table = field(default_factory=LOG_SCHEMA.empty_table)
    unindexed: int = 0  # commit records read one by one (not in the index)

    def files(self) -> set[str]:
        """The manifest files (identities) the commits came from."""
        return {f for f in pc.unique(self.table.column("file")).to_pylist() if f}

    def done(self, retry_errors: bool = False) -> KeySet:
        """The pairs a run skips: made, and (unless retried) permanently failed."""
        if retry_errors or not len(self.errors):
            return self.ok
        return KeySet(np.concatenate([self.ok.hashes, self.errors.hashes]))

    def complete_groups(self, file: str, group_pairs: np.ndarray, group_starts: np.ndarray, retry_errors: bool = False) -> frozenset[int]:
        """The row groups of manifest file `file` (its identity) whose expected pairs are all
        done: a resumed run need not read them."""
        t = self.table
        statuses = ["ok"] if retry_errors else ["ok", "error"]
        mask = pc.and_(pc.equal(t.column("file"), file), pc.is_in(t.column("status"), pa.array(statuses)))
        if not len(group_pairs) or not pc.any(mask).as_py():
            return frozenset()
        mine = t.filter(mask)
        groups = np.searchsorted(group_starts, mine.column("row").to_numpy(), side="right") - 1
        done = np.bincount(groups, weights=mine.column("covers").to_numpy(), minlength=len(group_pairs))
        return frozenset(int(g) for g in np.flatnonzero(done >= group_pairs))


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


def _log_rows(shard: str, t: pa.Table) -> pa.Table:
    """A commit record's rows in LOG_SCHEMA (records written before the key column: hashed here)."""
    names = t.column_names
    n = t.num_rows
    key = t.column("key") if "key" in names else pa.array(pair_hashes(t.column("id"), t.column("sample_index")), pa.uint64())
    return pa.table({
        "shard": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([shard])), "key": key,
        "status": t.column("status").cast(_TEXT),
        "covers": t.column("covers") if "covers" in names else pa.array(np.ones(n, np.int32)),
        "file": (t.column("file") if "file" in names else pa.nulls(n, pa.string())).cast(_TEXT),
        "row": t.column("row") if "row" in names else pa.nulls(n, pa.int64()),
        "content": t.column("content") if "content" in names else pa.nulls(n, pa.uint64()),
    }, schema=LOG_SCHEMA)


def _read(output: str, paths: list[str]) -> list[tuple[str, ShardResult, pa.Table]]:
    if not paths:
        return []
    fs, _ = filesystem(output)
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    out = []
    for path in paths:
        f = pq.ParquetFile(io.BytesIO(blobs[path]))
        stats = json.loads(f.schema_arrow.metadata[STATS_KEY])
        cols = [c for c in ("id", "sample_index", "key", "status", "covers", "file", "row", "content") if c in f.schema_arrow.names]
        out.append((path, ShardResult.from_stats(stats), _log_rows(shard_of(path), f.read(columns=cols))))
    return out


# an index that is absent or damaged: the records are read instead
_NO_INDEX = (FileNotFoundError, OSError, KeyError, ValueError, pa.ArrowException)


def _index_stats_of(f: pq.ParquetFile) -> dict[str, ShardResult]:
    return {name: ShardResult.from_stats(s) for name, s in json.loads(f.schema_arrow.metadata[STATS_KEY]).items()}


def _read_index(output: str) -> tuple[pa.Table, dict[str, ShardResult]]:
    fs, root = filesystem(output)
    try:
        f = pq.ParquetFile(io.BytesIO(fs.cat_file(join(root, INDEX_FILE))))
        stats, table = _index_stats_of(f), f.read()
        if "content" not in table.column_names:  # an index of a version before content hashes
            table = table.append_column("content", pa.nulls(table.num_rows, pa.uint64()))
        return table.cast(LOG_SCHEMA), stats
    except _NO_INDEX:
        return LOG_SCHEMA.empty_table(), {}


def _index_stats(output: str) -> dict[str, ShardResult]:
    """The index's shard stats, from its footer alone (not its 10^7 keys)."""
    fs, root = filesystem(output)
    try:
        with fs.open(join(root, INDEX_FILE), "rb") as fh:
            return _index_stats_of(pq.ParquetFile(fh))
    except _NO_INDEX:
        return {}


def _commits(listed: dict[str, str], indexed: dict[str, ShardResult], rest: list[tuple[str, ShardResult, pa.Table]]) -> list[Commit]:
    """Each listed shard's commit: the index's stats for those it holds (not those gone since: a
    --new-run wiped them), then the records written since."""
    results = {**{name: r for name, r in indexed.items() if name in listed}, **{shard_of(p): r for p, r, _ in rest}}
    return [Commit(name, results[name]) for name in sorted(results)]


def read_counts(output: str) -> tuple[list[Commit], int]:
    """What status and the report need: each commit's stats, and how many transient failures
    are pending (not made since). The keys are read only when some shard holds a transient failure."""
    listed = {shard_of(p): p for p in list_commits(output)}
    indexed = _index_stats(output)
    commits = _commits(listed, indexed, _read(output, [p for name, p in listed.items() if name not in indexed]))
    if not any(c.result.retryable for c in commits):
        return commits, 0
    return commits, len(read_log(output).retry)


def read_log(output: str) -> CommitLog:
    """The commit log: the index (one file) for the shards it holds, and each commit record
    written since, read one by one."""
    listed = {shard_of(p): p for p in list_commits(output)}
    indexed, indexed_stats = _read_index(output)
    in_index = [name for name in listed if name in indexed_stats]
    if len(in_index) < len(indexed_stats):  # shards the index holds that are gone (a --new-run wiped them)
        indexed = indexed.filter(pc.is_in(indexed.column("shard"), pa.array(in_index, pa.string())))
    rest = _read(output, [p for name, p in listed.items() if name not in indexed_stats])
    commits = _commits(listed, indexed_stats, rest)
    table = pa.concat_tables([indexed, *(t for _, _, t in rest)]).combine_chunks()
    key, status = table.column("key").to_numpy(), table.column("status")

    def keys(name: str) -> np.ndarray:
        return key[pc.equal(status, name).to_numpy(zero_copy_only=False)]

    ok, errors = KeySet(keys("ok")), KeySet(keys("error"))
    retry = keys("retry")
    retry = retry[~(ok.contains(retry) | errors.contains(retry))]  # transient failures made since are done
    return CommitLog(commits, ok, errors, KeySet(retry), table, unindexed=len(rest))


def write_index(output: str, log: CommitLog) -> None:
    """Fold the commit records into one index file, so that the next start reads one file
    instead of one per shard. The records stay (they are the truth; the index a cache)."""
    if not log.unindexed:
        return
    fs, root = filesystem(output)
    stats = json.dumps({c.name: asdict(c.result) for c in log.commits}).encode()
    write_atomic(fs, join(root, INDEX_FILE), _parquet_bytes(log.table, {STATS_KEY: stats}))


def drop_index(output: str) -> None:
    fs, root = filesystem(output)
    if fs.exists(join(root, INDEX_FILE)):
        fs.rm_file(join(root, INDEX_FILE))


def read_results(output: str) -> list[Commit]:
    """Each commit's stats."""
    return read_counts(output)[0]


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


def check_output(output: str, fingerprint: dict, *, new_run: bool, manifest: tuple[str, set[str]] | None = None) -> CommitLog:
    """Read-only: may this job continue OUTPUT? Returns what it holds (nothing for a new run).
    `manifest`: the job's manifest URL and its files' identities (see check_manifest)."""
    job = read_job(output)
    if job is not None and job["fingerprint"] != fingerprint and not new_run:
        diffs = "; ".join(_differences(job["fingerprint"], fingerprint))
        raise ResumeError(f"output already holds a job with other settings ({diffs}); "
                          "use another output, or pass --new-run to discard it and start over")
    if new_run:
        empty = KeySet(np.zeros(0, np.uint64))
        return CommitLog([], empty, empty, empty)
    log = read_log(output)
    if manifest is not None:
        check_manifest(job, *manifest, log)
    return log


def check_manifest(output_job: dict | None, manifest_url: str, identities: set[str], log: CommitLog) -> None:
    """Refuse to continue an output that was made from another manifest: its recorded manifest
    URL differs and none of the files its commits came from is in this manifest. (The same URL
    may grow or rotate its files, as a nightly prefix does; a manifest moved elsewhere keeps
    its files' identities.)"""
    if output_job is None or not log.table.num_rows or output_job.get("manifest") in (None, redact(manifest_url)):
        return
    recorded = log.files()
    if recorded and not recorded & identities:
        raise ResumeError(f"output holds a job made from another manifest ({output_job['manifest']}, none of whose "
                          f"{len(recorded)} file(s) is in {redact(manifest_url)}); use another output, or pass --new-run "
                          "to discard it and start over")


def wipe(output: str) -> None:
    fs, root = filesystem(output)
    for name in (*DATASETS, COMMITS, RETIRED, RUNS_DIR):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name), recursive=True)
    for name in (JOB_FILE, SUMMARY_FILE, INDEX_FILE):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name))


def remove_debris(output: str, commits: list[Commit]) -> list[str]:
    """Delete shard files without a commit record, stray temp files (of shards, commit
    records, run records, _job.json and _summary.json), and errors files of shards whose
    errors were retired (a --retry-errors run stopped midway)."""
    fs, root = filesystem(output)
    by_name = {c.name: c.result for c in commits}
    removed = []
    for where in (root, join(root, COMMITS), join(root, RUNS_DIR)):  # a crash mid-write of _job.json, _summary.json or a record
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
    if any(c.result.errors for c in commits):
        drop_index(output)  # the records it folded are about to change
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
