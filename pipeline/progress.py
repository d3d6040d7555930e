"""Live per-stage counts: what each model stage reports as it works, and what the driver shows.

Committed shards come seconds or minutes after the rows in them finished (a shard waits
for `rows_per_shard` rows or `max_shard_seconds`), so counting commits alone says `0/N`
long after work started. Here each stage reports, per batch, the samples it started and
finished, and once per replica when its model starts and ends loading (`StageEvent`,
through a plain callable: this package never sees Ray). `StageBoard` keeps the counts;
jobs/progress.py holds one in a Ray actor that every stage replica reports to.

A sample is counted by each stage it passes, failed or not (a failed sample passes the
later stages untouched), so the last stage's count is this run's (id, sample) pairs done.
A batch whose actor dies mid-stage is started again by Ray: its first start stays in
`started`, so `in_flight` then reads one batch high.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

EventKind = Literal["loading", "loaded", "started", "finished"]
RATE_WINDOW_SECONDS = 30.0  # long enough to smooth the steps of big batches, short enough to follow a slowdown


@dataclass(frozen=True)
class StageEvent:
    """One report from a stage replica: its model `loading` / `loaded` (rows 0), or a batch
    of `rows` samples `started` / `finished`."""

    stage: str
    kind: EventKind
    rows: int = 0


Report = Callable[[StageEvent], None]


@dataclass(frozen=True)
class StageCounts:
    done: int
    in_flight: int
    rate: float  # samples finished per second over the recent window (all replicas)
    loading: bool  # no replica loaded yet, or one still loading


@dataclass(frozen=True)
class BoardSnapshot:
    """The counts of every stage, in pipeline order, and the phase they add up to."""

    stages: dict[str, StageCounts]
    phase: str

    @property
    def last(self) -> StageCounts:
        return list(self.stages.values())[-1]


@dataclass
class _Stage:
    started: int = 0
    done: int = 0
    loading: int = 0
    loaded: int = 0
    # (time, done) after each finished batch; the newest point older than the window stays as the rate's base
    history: deque[tuple[float, int]] = field(default_factory=deque)

    def rate(self, now: float) -> float:
        while len(self.history) > 1 and self.history[1][0] <= now - RATE_WINDOW_SECONDS:
            self.history.popleft()
        if not self.history:
            return 0.0
        t0, done0 = self.history[0]
        # measured to now, not to the last batch: a stalled stage's rate falls while it stalls
        return (self.done - done0) / (now - t0) if now > t0 else 0.0


class StageBoard:
    """Counts per stage from StageEvents. `stages`: the pipeline's model stages in order;
    `todo`: the (id, sample) pairs this run sends through them."""

    def __init__(self, stages: list[str], todo: int, clock: Callable[[], float] = time.monotonic):
        self.order, self.todo, self.clock = list(stages), todo, clock
        self._stages = {s: _Stage() for s in stages}

    def add(self, event: StageEvent) -> None:
        s = self._stages.setdefault(event.stage, _Stage())
        now = self.clock()
        if event.kind == "loading":
            s.loading += 1
        elif event.kind == "loaded":
            s.loaded += 1
        elif event.kind == "started":
            if not s.history:  # the rate counts from the stage's first batch, not from the job's start
                s.history.append((now, 0))
            s.started += event.rows
        else:
            s.done += event.rows
            s.history.append((now, s.done))

    def snapshot(self) -> BoardSnapshot:
        now = self.clock()
        counts = {name: StageCounts(done=s.done, in_flight=max(s.started - s.done, 0), rate=s.rate(now),
                                    loading=s.loaded == 0 or s.loading > s.loaded)
                  for name, s in self._stages.items()}
        return BoardSnapshot(counts, phase_of(counts, self.todo))


def phase_of(stages: dict[str, StageCounts], todo: int) -> str:
    """`loading A, B` until the last stage finished a sample while some stage's model still
    loads (a replica added later shows as `generating (loading A)`), then `generating`, then
    `finishing` once every pair is through the last stage and only shards are left to commit."""
    loading = [name for name, c in stages.items() if c.loading]
    last_done = list(stages.values())[-1].done if stages else 0
    if loading and last_done == 0:
        return "loading " + ", ".join(loading)
    if last_done >= todo:
        return "finishing"
    return "generating" + (f" (loading {', '.join(loading)})" if loading else "")
