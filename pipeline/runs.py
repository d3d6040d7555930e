"""The run history: OUTPUT/_runs/, one small JSON file per run, and the state of each run.

A run's record appears when the run really starts (status `running`: it holds the lease, the
debris is gone) and is rewritten when it ends (completed, incomplete, stopped, failed or
interrupted); a run with nothing to do writes one that has already ended. A driver that is
killed leaves its record at `running`: readers call that run `dead` unless its driver still
holds the output's lease and beats. File names sort by start time and never collide
(`20261202T021500123456Z-1a2b3c4d.json`: the UTC start, then random), so the listing alone
orders the runs and only the records shown are read. Outputs of versions before _runs/ have
only _job.json's `runs` (fewer fields); their runs are read from there.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from bisect import bisect_right
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from pipeline.lease import Lease, alive, this_host
from pipeline.manifest import Manifest
from pipeline.plan import Plan
from pipeline.resume import RUNS_DIR, Commit
from pipeline.storage import filesystem, join, redact, write_atomic
from pipeline.version import __version__

RUNNING = "running"
_NAME_TIME = "%Y%m%dT%H%M%S%fZ"
_NAME = re.compile(r"\d{8}T\d{12}Z-[0-9a-f]{8}")  # a record's name; other files in _runs/ are not records


def iso(t: float) -> str:
    """A Unix time as ISO 8601 UTC, to the millisecond: 2025-01-31T12:00:00.000+00:00."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _unix(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


@dataclass(frozen=True)
class RunCounts:
    expected: int  # the manifest's (id, sample) pairs when the run started
    committed_before: int  # pairs earlier runs had committed
    committed: int = 0  # pairs this run committed: made, or failed for good
    images: int = 0
    texts: int = 0
    errors: int = 0  # this run's permanent errors
    retryable: int = 0  # this run's transient failures (the next run makes them)


@dataclass(frozen=True)
class RunEntry:
    """One run, as its record in _runs/ holds it."""

    name: str  # the record's file name without .json; "" for a run of an older version (from _job.json)
    started_at: float
    host: str
    pid: int
    genfleet_version: str
    manifest: str  # redacted
    manifest_files: int  # files the manifest listed
    new_manifest_files: tuple[str, ...]  # those this output had not seen before, by their path below the manifest root
    counts: RunCounts
    retry_errors: bool = False
    status: str = RUNNING
    ended_at: float | None = None
    rows_per_second: float | None = None

    @property
    def recorded(self) -> bool:
        """Whether it has a record in _runs/ (not only a line in an older version's _job.json)."""
        return bool(self.name)

    def begun(self, committed_before: int) -> RunEntry:
        """The run really starts, with this many pairs committed by earlier runs."""
        return replace(self, counts=replace(self.counts, committed_before=committed_before))

    def to_json(self) -> dict:
        return {"started_at": iso(self.started_at), "ended_at": iso(self.ended_at) if self.ended_at is not None else None,
                "status": self.status, "host": self.host, "pid": self.pid, "genfleet_version": self.genfleet_version,
                "manifest": self.manifest, "manifest_files": {"seen": self.manifest_files, "new": list(self.new_manifest_files)},
                "counts": asdict(self.counts), "rows_per_second": self.rows_per_second, "retry_errors": self.retry_errors}

    @classmethod
    def from_json(cls, name: str, data: dict) -> RunEntry:
        files = data.get("manifest_files") or {}
        return cls(name, _unix(data["started_at"]) or 0.0, data.get("host", ""), int(data.get("pid", 0)), data.get("genfleet_version", ""),
                   data.get("manifest", ""), int(files.get("seen", 0)), tuple(files.get("new", ())), RunCounts(**data["counts"]),
                   bool(data.get("retry_errors")), data.get("status", RUNNING), _unix(data.get("ended_at")), data.get("rows_per_second"))


def start_entry(started_at: float, *, manifest: Manifest, plan: Plan, retry_errors: bool) -> RunEntry:
    """This run's record, before it starts. New files: those the plan read itself (the output's
    plan cache, `_plan/`, holds every file an earlier run saw, by identity: a rewritten file is new)."""
    new = {fp.identity for fp in plan.new_files}
    name = f"{datetime.fromtimestamp(started_at, UTC).strftime(_NAME_TIME)}-{uuid.uuid4().hex[:8]}"
    return RunEntry(name, started_at, this_host(), os.getpid(), __version__, redact(manifest.url), len(manifest.files),
                    tuple(f.rel for f in manifest.files if f.identity in new), RunCounts(plan.expected_pairs, 0), retry_errors)


def write_run(output: str, entry: RunEntry) -> None:
    fs, root = filesystem(output)
    write_atomic(fs, join(root, RUNS_DIR, f"{entry.name}.json"), json.dumps(entry.to_json(), indent=1).encode())


def list_runs(output: str) -> list[str]:
    """The records' names, oldest first."""
    fs, root = filesystem(output)
    fs.invalidate_cache(join(root, RUNS_DIR))  # listings are cached per filesystem instance
    try:
        paths = fs.ls(join(root, RUNS_DIR), detail=False)
    except FileNotFoundError:
        return []
    names = (p.rsplit("/", 1)[-1][: -len(".json")] for p in paths if p.endswith(".json"))
    return sorted(n for n in names if _NAME.fullmatch(n))


def _name_time(name: str) -> float:
    return datetime.strptime(name.split("-", 1)[0], _NAME_TIME).replace(tzinfo=UTC).timestamp()


def read_runs(output: str, names: list[str]) -> list[RunEntry]:
    if not names:
        return []
    fs, root = filesystem(output)
    paths = [join(root, RUNS_DIR, f"{n}.json") for n in names]
    blobs = fs.cat(paths) if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    by_path = {p.rsplit("/", 1)[-1]: b for p, b in blobs.items()}  # fsspec may give the paths without a protocol
    return [_parse(n, by_path[f"{n}.json"]) for n in names]


def _parse(name: str, data: bytes) -> RunEntry:
    try:
        return RunEntry.from_json(name, json.loads(data))
    except (ValueError, KeyError, TypeError):  # a record damaged since (or written by hand): the run still counts
        return RunEntry(name, _name_time(name), "", 0, "", "", 0, (), RunCounts(0, 0), status="unreadable")


def _legacy(job: dict, run: dict) -> RunEntry:
    """A run an older version recorded only in _job.json."""
    return RunEntry("", run["started_at"], "", 0, "", job.get("manifest", ""), 0, (),
                    RunCounts(job.get("expected_pairs", 0), run.get("committed_before", 0)), bool(run.get("retry_errors")), status="-")


def run_state(finished: dict | None, lease: Lease | None) -> str:
    """`running` while a driver holds the lease and beats (pipeline/lease.py); otherwise how
    the last run ended (its summary), or `dead`: its driver went without writing one (killed,
    or its machine lost). A summary older than the lease is the previous run's."""
    if lease is not None:
        ended = datetime.fromisoformat(finished["ended_at"]).timestamp() if finished and "ended_at" in finished else None
        if finished is None or (ended is not None and lease.since > ended):
            return "running" if alive(lease) else "dead"
    return finished["status"] if finished else "dead"


@dataclass(frozen=True)
class RunInfo:
    """A run as `genfleet status` and the report show it."""

    number: int  # 1-based, oldest first
    entry: RunEntry
    state: str  # how it ended, `running`, or `dead` (its driver gone without ending it); "-": an older version's run
    wall_seconds: float | None
    wall_source: str  # where wall_seconds comes from: "run record", "summary", "last commit", "so far", or "-"
    committed: int  # (id, sample) pairs committed during this run
    commits: list[tuple[float, int]]  # (committed_at, pairs) of the shards committed while it ran

    @property
    def started_at(self) -> float:
        return self.entry.started_at

    @property
    def committed_before(self) -> int:
        return self.entry.counts.committed_before

    @property
    def retry_errors(self) -> bool:
        return self.entry.retry_errors

    def brief(self) -> dict:
        """One line of `genfleet status`'s history."""
        e = self.entry
        return {"started_at": iso(e.started_at), "wall_seconds": round(self.wall_seconds, 2) if self.wall_seconds is not None else None,
                "new_pairs": self.committed, "status": self.state,
                "new_manifest_files": list(e.new_manifest_files) if e.recorded else None}


def _state(entry: RunEntry, last: bool, summary: dict | None, lease: Lease | None) -> str:
    if not entry.recorded:
        return run_state(summary, lease) if last else "-"
    if entry.status != RUNNING:
        return entry.status
    if lease is not None and alive(lease) and (lease.host, lease.pid) == (entry.host, entry.pid):
        return RUNNING
    if summary is not None and _unix(summary.get("started_at")) == entry.started_at:
        return summary["status"]  # killed after its summary, before its record
    return "dead"


def history(output: str, job: dict, commits: list[Commit], summary: dict | None, lease: Lease | None, now: float,
            last: int | None = None) -> list[RunInfo]:
    """The output's runs, oldest first (only the `last` ones: only their records are read), each
    with its state, its wall time and the commits made while it ran (by their committed_at)."""
    names = list_runs(output)
    first = _name_time(names[0]) if names else None
    legacy = [_legacy(job, r) for r in job.get("runs", []) if first is None or r["started_at"] < first]
    starts = [e.started_at for e in legacy] + [_name_time(n) for n in names]
    mine: list[list[tuple[float, int]]] = [[] for _ in starts]
    for c in commits if starts else ():
        at = c.result.committed_at
        mine[max(bisect_right(starts, at) - 1, 0)].append((at, c.result.pairs))  # worker clocks may run a bit behind
    total = len(starts)
    shown = range(max(total - last, 0) if last is not None else 0, total)
    first_record = max(shown.start, len(legacy))  # the records shown: only these are read
    records = dict(zip(range(first_record, total), read_runs(output, names[first_record - len(legacy):]), strict=True))
    out = []
    for i in shown:
        entry = records[i] if i >= len(legacy) else legacy[i]
        is_last = i == total - 1
        state = _state(entry, is_last, summary, lease)
        times = sorted(mine[i])
        this_run = (summary or {}).get("this_run", {})
        wall: float | None
        if entry.ended_at is not None:
            wall, source = entry.ended_at - entry.started_at, "run record"
        elif state == RUNNING:
            wall, source = now - entry.started_at, "so far"
        elif is_last and summary is not None and state == summary.get("status") and this_run.get("rows"):
            wall, source = this_run.get("wall_seconds"), "summary"  # exact; a no-op resume has rows 0
        elif times:
            wall, source = times[-1][0] - entry.started_at, "last commit"
        else:
            wall, source = None, "-"
        committed = entry.counts.committed if entry.ended_at is not None else sum(p for _, p in times)
        out.append(RunInfo(i + 1, entry, state, wall, source, committed, times))
    return out
