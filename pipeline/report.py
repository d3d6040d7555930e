"""Tallies, status and the end-of-run summary, all from shard results (commit stats).
The live display is pipeline/display.py."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime

from pipeline.changes import Changes
from pipeline.lease import Lease, read_lease
from pipeline.resume import SUMMARY_FILE, NoJob, read_counts, read_job
from pipeline.runs import RunEntry, history, iso, run_state, write_run
from pipeline.score_stats import describe
from pipeline.score_stats import merge as merge_scores
from pipeline.sink import ShardResult
from pipeline.storage import filesystem, join, write_atomic
from pipeline.version import __version__

log = logging.getLogger("genfleet")
HISTORY_SHOWN = 10  # runs in `genfleet status`


def _merge(into: dict[str, int], counts: dict[str, int]) -> None:
    for k, v in counts.items():
        into[k] = into.get(k, 0) + v


@dataclass
class Tally:
    """Counts over a set of shard results."""

    shards: int = 0
    rows: int = 0
    pairs: int = 0  # (id, sample) pairs done: made or failed for good; compare with the plan's expected
    images: int = 0
    texts: int = 0
    errors: int = 0  # permanent
    retryable: int = 0  # transient failures: a later run makes them again
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    retryable_by_kind: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    score_stats: dict[str, dict] = field(default_factory=dict)

    def add(self, r: ShardResult) -> None:
        self.shards += 1
        for k in ("rows", "pairs", "images", "texts", "errors", "retryable"):
            setattr(self, k, getattr(self, k) + getattr(r, k))
        _merge(self.errors_by_kind, r.errors_by_kind)
        _merge(self.retryable_by_kind, r.retryable_by_kind)
        _merge(self.stage_rows, r.stage_rows)
        for k, s in r.stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + s
        merge_scores(self.score_stats, r.score_stats)

    @classmethod
    def of(cls, results) -> Tally:
        t = cls()
        for r in results:
            t.add(r)
        return t


def stage_throughput(t: Tally) -> dict[str, float]:
    """Samples per busy second of one replica, per stage."""
    return {s: round(t.stage_rows[s] / sec, 3) for s, sec in t.stage_seconds.items() if sec > 0}


def summary(before: Tally, this_run: Tally, *, expected: int, started_at: float, status: str,
            model_fingerprint: str | None = None, changes: Changes | None = None) -> dict:
    """The end-of-run summary: earlier runs' commits plus this run's. Transient failures
    are this run's only: earlier ones were all made again in this run. Provenance: which
    genfleet and which model files (the family's fingerprint) made them, and when.
    `changes`: rows edited since their pairs were committed (pipeline/changes.py)."""
    ended = time.time()
    wall = ended - started_at
    changes = changes or Changes()
    total = Tally.of([])
    for t in (before, this_run):
        for k in ("shards", "rows", "pairs", "images", "texts", "errors"):
            setattr(total, k, getattr(total, k) + getattr(t, k))
        _merge(total.errors_by_kind, t.errors_by_kind)
        _merge(total.stage_rows, t.stage_rows)
        for k, s in t.stage_seconds.items():
            total.stage_seconds[k] = total.stage_seconds.get(k, 0.0) + s
        merge_scores(total.score_stats, t.score_stats)
    return {
        "status": status,
        "expected": expected,
        "committed": total.pairs,
        "missing": max(expected - total.pairs, 0),
        "images": total.images,
        "texts": total.texts,
        "errors": total.errors,
        "errors_by_kind": dict(sorted(total.errors_by_kind.items())),
        "retryable": this_run.retryable,
        "retryable_by_kind": dict(sorted(this_run.retryable_by_kind.items())),
        "shards": total.shards,
        "changed_rows": changes.rows,
        "changed_examples": list(changes.examples),
        "this_run": {"rows": this_run.rows, "wall_seconds": round(wall, 2),
                     "rows_per_second": round(this_run.rows / wall, 3) if wall > 0 else None},
        "stage_rows_per_second": stage_throughput(total),
        **describe(total.score_stats),  # e.g. clip_score: count, mean, min, p05 ... p95, max
        "genfleet_version": __version__,
        "model_fingerprint": model_fingerprint,
        "started_at": iso(started_at),
        "ended_at": iso(ended),
    }


def write_summary(output: str, data: dict) -> None:
    fs, root = filesystem(output)
    write_atomic(fs, join(root, SUMMARY_FILE), json.dumps(data, indent=1).encode())


def finish_run(output: str, data: dict, entry: RunEntry | None, this_run: Tally) -> None:
    """A run's end: its summary (`data`), then its record in _runs/ with how it ended and
    this run's counts (`entry` None: the run never really started, so it has no record; and an
    output that holds no job yet gets no summary either)."""
    if entry is None and read_job(output) is None:
        return
    write_summary(output, data)
    if entry is not None:
        counts = replace(entry.counts, committed=this_run.pairs, images=this_run.images, texts=this_run.texts,
                         errors=this_run.errors, retryable=this_run.retryable)
        write_run(output, replace(entry, status=data["status"], ended_at=datetime.fromisoformat(data["ended_at"]).timestamp(),
                                  counts=counts, rows_per_second=data["this_run"]["rows_per_second"]))


def read_summary(output: str) -> dict | None:
    fs, root = filesystem(output)
    try:
        return json.loads(fs.cat_file(join(root, SUMMARY_FILE)))
    except FileNotFoundError:
        return None


def _driver(lease: Lease | None) -> str:
    if lease is None:
        return "-"
    return f"{lease.host}:{lease.pid}, last heartbeat {max(time.time() - lease.heartbeat, 0):.0f}s ago"


def status(output: str) -> dict:
    """What `genfleet status` shows, for a running or finished job."""
    job = read_job(output)
    if job is None:
        raise NoJob(f"no genfleet job at {output} (no _job.json)")
    finished = read_summary(output)
    lease = read_lease(output)
    state = run_state(finished, lease)
    commits, pending = read_counts(output)  # a transient failure is pending until a later shard holds its pair
    t = Tally.of(c.result for c in commits)
    runs = history(output, job, commits, finished, lease, time.time(), last=HISTORY_SHOWN)
    run = job["runs"][-1]
    ended = finished if state not in ("running", "dead") else None  # (a summary beside a live lease is the last run's)
    elapsed = (ended or {}).get("this_run", {}).get("wall_seconds") or (time.time() - run["started_at"])
    done_now = t.pairs - run["committed_before"]
    return {
        "state": state,
        "driver": _driver(lease) if state in ("running", "dead") else "-",
        "expected": job["expected_pairs"],
        "committed": t.pairs,
        "images": t.images,
        "texts": t.texts,
        "errors": t.errors,
        "retryable": pending,
        "errors_by_kind": t.errors_by_kind,
        "rows_per_second": round(done_now / elapsed, 3) if elapsed > 0 else None,
        "stage_rows_per_second": stage_throughput(t),
        **describe(t.score_stats),
        "runs": runs[-1].number if runs else 0,
        "history": [r.brief() for r in runs],  # the last HISTORY_SHOWN runs, oldest first
    }


def _cell(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "-"
    return "-" if v is None else str(v)


def _rows(items: list[dict]) -> list[str]:
    """A list of flat dicts as an aligned table under its key: a header, then a line each."""
    head = list(items[0]) if items else []
    cells = [head, *([_cell(item.get(h)) for h in head] for item in items)]
    widths = [max(len(row[c]) for row in cells) for c in range(len(head))]
    return ["    " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def format_table(data: dict) -> str:
    lines = []
    for k, v in data.items():
        if isinstance(v, list) and all(isinstance(x, dict) for x in v):
            lines.append(f"  {k:<24} {'' if v else '-'}".rstrip())
            lines += _rows(v) if v else []
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        lines.append(f"  {k:<24} {v}")
    return "\n".join(lines)
