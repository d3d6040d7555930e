"""Resume: what an output already holds, and whether this job may continue it.

The commit records under OUTPUT/_commits/ are the log. Start-up reads only their
(id, sample_index) columns (8 bytes a key in memory), removes shard files that
have no commit record (a crash between a shard's files and its commit), and
refuses to continue an output written with settings that change the results.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline.keys import KeySet, pair_hashes
from pipeline.sink import COMMITS, DATASETS, STATS_KEY
from pipeline.storage import filesystem, join, write_atomic

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"


class ResumeError(ValueError):
    """The output holds a different job; the message says what differs."""


@dataclass(frozen=True)
class Commit:
    name: str
    stats: dict
    keys: np.ndarray | None = None  # pair hashes, when asked for


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


def read_commits(output: str, paths: list[str], with_keys: bool = False) -> list[Commit]:
    """Read commit records (concurrently on object stores: fs.cat batches)."""
    if not paths:
        return []
    fs, _ = filesystem(output)
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    commits = []
    for path in paths:
        table = pq.read_table(io.BytesIO(blobs[path]), columns=["id", "sample_index"] if with_keys else [])
        stats = json.loads(pq.read_schema(io.BytesIO(blobs[path])).metadata[STATS_KEY])
        keys = pair_hashes(table.column("id").to_pylist(), table.column("sample_index").to_pylist()) if with_keys else None
        commits.append(Commit(shard_of(path), stats, keys))
    return commits


def committed_keys(output: str) -> tuple[KeySet, list[Commit]]:
    commits = read_commits(output, list_commits(output), with_keys=True)
    keys = np.concatenate([c.keys for c in commits]) if commits else np.zeros(0, np.uint64)
    return KeySet(keys), [Commit(c.name, c.stats) for c in commits]


def remove_debris(output: str, committed: set[str]) -> list[str]:
    """Delete shard files without a commit record, and stray temp files."""
    fs, root = filesystem(output)
    removed = []
    for dataset in DATASETS:
        fs.invalidate_cache(join(root, dataset))
        try:
            paths = fs.ls(join(root, dataset), detail=False)
        except FileNotFoundError:
            continue
        for p in paths:
            if ".tmp-" in p or shard_of(p) not in committed:
                fs.rm(p)
                removed.append(p)
    return removed


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


def wipe(output: str) -> None:
    fs, root = filesystem(output)
    for name in (*DATASETS, COMMITS):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name), recursive=True)
    for name in (JOB_FILE, SUMMARY_FILE):
        if fs.exists(join(root, name)):
            fs.rm(join(root, name))


def start_run(output: str, fingerprint: dict, *, manifest: str, expected_pairs: int, new_run: bool) -> tuple[KeySet, list[Commit]]:
    """Check the output against this job, clean it, record the run; returns the
    committed keys (to skip) and the commits so far (for progress)."""
    job = read_job(output)
    if job is not None and job["fingerprint"] != fingerprint:
        if not new_run:
            diffs = "; ".join(_differences(job["fingerprint"], fingerprint))
            raise ResumeError(f"output already holds a job with other settings ({diffs}); "
                              "use another output, or pass --new-run to discard it and start over")
    if job is not None and new_run:
        wipe(output)
        job = None
    keys, commits = committed_keys(output)
    remove_debris(output, {c.name for c in commits})
    runs = (job or {}).get("runs", []) + [{"started_at": time.time(), "committed_before": len(keys)}]
    record = {"fingerprint": fingerprint, "manifest": manifest, "expected_pairs": expected_pairs, "runs": runs}
    fs, root = filesystem(output)
    write_atomic(fs, join(root, JOB_FILE), json.dumps(record, indent=1, default=str).encode())
    if fs.exists(join(root, SUMMARY_FILE)):  # a summary describes a finished run only
        fs.rm_file(join(root, SUMMARY_FILE))
    return keys, commits
