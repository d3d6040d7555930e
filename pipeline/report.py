"""Progress, status and the end-of-job summary, all read off the commit records."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

from pipeline.resume import SUMMARY_FILE, Commit, list_commits, read_commits, read_job, shard_of
from pipeline.storage import filesystem, join, write_atomic

log = logging.getLogger("genfleet")


@dataclass
class Tally:
    """Counts over a set of commit records."""

    rows: int = 0
    pairs: int = 0  # (id, sample) pairs accounted for: compare with the plan's expected
    images: int = 0
    texts: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_rows: dict[str, int] = field(default_factory=dict)
    shards: int = 0

    def add(self, stats: dict) -> None:
        self.shards += 1
        for k in ("rows", "pairs", "images", "texts", "errors"):
            setattr(self, k, getattr(self, k) + stats.get(k, 0))
        for src, dst in (("errors_by_kind", self.errors_by_kind), ("stage_seconds", self.stage_seconds), ("stage_rows", self.stage_rows)):
            for k, v in stats.get(src, {}).items():
                dst[k] = dst.get(k, 0) + v


class CommitWatcher:
    """Tallies commit records as they appear (each read once)."""

    def __init__(self, output: str, initial: list[Commit] = ()):
        self.output, self.tally, self.seen = output, Tally(), set()
        for c in initial:
            self.seen.add(c.name)
            self.tally.add(c.stats)

    def poll(self) -> Tally:
        new = [p for p in list_commits(self.output) if shard_of(p) not in self.seen]
        for c in read_commits(self.output, new):
            self.seen.add(c.name)
            self.tally.add(c.stats)
        return self.tally


def stage_throughput(t: Tally) -> dict[str, float]:
    """Rows per busy second of one replica, per stage."""
    return {s: round(t.stage_rows[s] / sec, 3) for s, sec in t.stage_seconds.items() if sec > 0}


def summary(t: Tally, *, expected: int, started_at: float, committed_before: int, status: str) -> dict:
    """The end-of-run summary from the tally of every commit record (this run's and earlier ones)."""
    wall = time.time() - started_at
    new_rows = t.rows - committed_before
    return {
        "status": status,
        "expected": expected,
        "committed": t.pairs,
        "images": t.images,
        "texts": t.texts,
        "errors": t.errors,
        "errors_by_kind": dict(sorted(t.errors_by_kind.items())),
        "shards": t.shards,
        "this_run": {"rows": new_rows, "wall_seconds": round(wall, 2), "rows_per_second": round(new_rows / wall, 3) if wall > 0 else None},
        "stage_rows_per_second": stage_throughput(t),
    }


def write_summary(output: str, data: dict) -> None:
    fs, root = filesystem(output)
    write_atomic(fs, join(root, SUMMARY_FILE), json.dumps(data, indent=1).encode())


def status(output: str) -> dict:
    """What `genfleet status` shows, for a running or finished job."""
    job = read_job(output)
    if job is None:
        raise FileNotFoundError(f"no genfleet job at {output} (no _job.json)")
    fs, root = filesystem(output)
    try:
        finished = json.loads(fs.cat_file(join(root, SUMMARY_FILE)))
    except FileNotFoundError:
        finished = None
    t = CommitWatcher(output).poll()
    run = job["runs"][-1]
    elapsed = (finished or {}).get("this_run", {}).get("wall_seconds") or (time.time() - run["started_at"])
    done_now = t.rows - run["committed_before"]
    return {
        "state": finished["status"] if finished else "running or stopped",
        "expected": job["expected_pairs"],
        "committed": t.pairs,
        "images": t.images,
        "texts": t.texts,
        "errors": t.errors,
        "errors_by_kind": t.errors_by_kind,
        "rows_per_second": round(done_now / elapsed, 3) if elapsed > 0 else None,
        "stage_rows_per_second": stage_throughput(t),
        "runs": len(job["runs"]),
    }


def format_table(data: dict) -> str:
    lines = []
    for k, v in data.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        lines.append(f"  {k:<24} {v}")
    return "\n".join(lines)


class Progress:
    """A live bar on a terminal, plain log lines elsewhere."""

    def __init__(self, total: int, done: int, interactive: bool | None = None):
        self.total, self.start_done, self.started = total, done, time.time()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._last_log = 0.0
        self._bar = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("genfleet"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} rows/s"),
                            TextColumn("errors {task.fields[errors]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task("rows", total=total, completed=done, rate="-", errors=0)
            self._bar.start()

    def update(self, t: Tally) -> None:
        elapsed = time.time() - self.started
        rate = (t.pairs - self.start_done) / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=t.pairs, rate=f"{rate:.2f}", errors=t.errors)
        elif time.time() - self._last_log >= 10 or t.pairs >= self.total:
            self._last_log = time.time()
            eta = f"{(self.total - t.pairs) / rate:.0f}s" if rate > 0 else "-"
            log.info("progress %d/%d, %.2f rows/s, %d errors, eta %s", t.pairs, self.total, rate, t.errors, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
