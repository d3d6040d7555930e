"""The progress board: one small Ray actor that every stage replica reports to, and the
driver's thread that reads it about once a second for the display (pipeline/report.py).

Stages report with fire-and-forget `.remote()` calls: one per batch and stage, never
waited on, so a slow or lost board cannot hold up a model stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from pipeline.progress import BoardSnapshot, StageBoard, StageEvent

log = logging.getLogger("genfleet")
POLL_SECONDS = 1.0
SNAPSHOT_TIMEOUT_SECONDS = 30.0
FINAL_WAIT_SECONDS = 5.0  # a board that does not answer (its node lost) only stops the display


class ProgressBoard:
    """A StageBoard in an actor. Its clock is the board's own: events are timed when they
    arrive, so replicas on other machines need no common clock."""

    def __init__(self, stages: list[str], todo: int):
        self.board = StageBoard(stages, todo)

    def report(self, event: StageEvent) -> None:
        self.board.add(event)

    def snapshot(self) -> BoardSnapshot:
        return self.board.snapshot()


# no CPU of its own: it must not take a slot from a stage's actor pool
_BoardActor = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard)


class BoardReporter:
    """The `report` callable the stage groups get (pickled into their constructor kwargs)."""

    def __init__(self, board):
        self.board = board

    def __eq__(self, other) -> bool:  # the same board: the same job (stages in tasks keep their build per job)
        return isinstance(other, BoardReporter) and self.board == other.board  # (actor handles compare by actor id)

    def __hash__(self) -> int:
        return hash(self.board)

    def __call__(self, event: StageEvent) -> None:
        try:
            self.board.report.remote(event)
        except Exception as e:  # noqa: BLE001 - progress never fails a stage
            log.debug("progress report of %s lost: %s", event.stage, e)


class BoardWatcher:
    """Reads the board every POLL_SECONDS and hands each snapshot to `show`, from a thread of
    its own, until stopped; the first read (before any stage starts) and a last one (the
    final counts) happen in the caller's thread."""

    def __init__(self, stages: list[str], todo: int, show: Callable[[BoardSnapshot], None]):
        self.board: Any = _BoardActor.remote(stages, todo)  # an ActorHandle
        self.todo = todo
        self.reporter = BoardReporter(self.board)
        self.show = show
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="genfleet-progress")
        self._working = True
        self._through = todo  # the samples the last stage will have counted at the end (see passed)

    def passed(self, rows: int) -> None:
        """The pipeline handed out `rows` samples, each of them through every stage: the final
        counts wait for those, not for the plan's todo. (A row that fails validation is planned at
        its num_samples but passes the stages as one error row: waiting for the plan's count would
        hold every such run up FINAL_WAIT_SECONDS, for reports that never come.)"""
        self._through = rows

    def _read(self) -> BoardSnapshot | None:
        if not self._working:
            return None
        try:
            snap = ray.get(self.board.snapshot.remote(), timeout=SNAPSHOT_TIMEOUT_SECONDS)
        except Exception as e:  # noqa: BLE001 - the job goes on without live counts
            self._working = False
            log.warning("live progress stopped: the progress board did not answer (%s); shards still commit", type(e).__name__)
            return None
        self.show(snap)
        return snap

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._read()

    def __enter__(self) -> BoardWatcher:
        self._read()
        self._thread.start()
        return self

    def __exit__(self, kind, *exc) -> None:
        self._stop.set()
        self._thread.join()
        snap = self._read()
        # every sample handed out was reported by the stages it passed; a report from another process
        # may still be on its way (reports and reads are not ordered): the final counts wait for it, briefly
        deadline = time.monotonic() + FINAL_WAIT_SECONDS
        while kind is None and snap is not None and snap.stages and snap.last.done < self._through and time.monotonic() < deadline:
            self._stop.wait(POLL_SECONDS / 10)
            snap = self._read()
        ray.kill(self.board)
