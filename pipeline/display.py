"""The live progress display: a bar on a terminal, a plain log line every LOG_SECONDS elsewhere.

It shows what the stages report (pipeline/progress.py: samples through each stage, in
flight, samples/s, the phase) beside what is committed (shard results). Both the count
and the ETA come from the last model stage: the ETA is the remaining pairs over the very
rate shown (rich's own ETA column estimates its own speed, which disagreed with it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.progress import BoardSnapshot, StageCounts

log = logging.getLogger("genfleet")
LOG_SECONDS = 10.0
FLUSH_MARK = b"\x00genfleet: stderr relay flush\n"  # one write, shorter than PIPE_BUF: never mixed with another line
FLUSH_SECONDS = 5.0  # a close never hangs on a relay thread stuck on a full terminal


def duration(seconds: float) -> str:
    """45s, 3m05s, 2h03m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass(frozen=True)
class ProgressState:
    """What the display shows, in (id, sample) pairs; earlier runs' commits count as finished."""

    phase: str
    total: int
    finished: int  # through the last model stage
    committed: int
    errors: int
    rate: float  # the last model stage's pairs/s over the recent window
    stages: dict[str, StageCounts] = field(default_factory=dict)

    @property
    def eta_seconds(self) -> float | None:
        return (self.total - self.finished) / self.rate if self.rate > 0 else None

    @property
    def eta(self) -> str:
        e = self.eta_seconds
        return duration(e) if e is not None else "-"

    def stage_text(self, name: str) -> str:
        c = self.stages[name]
        return f"{name} {c.done} done, {c.in_flight} in flight, {c.rate:.2f} rows/s" + (", loading" if c.loading else "")

    def line(self) -> str:
        """The facts as one log line."""
        head = (f"progress {self.finished}/{self.total} {self.phase}, committed {self.committed}, {self.rate:.2f} rows/s, "
                f"eta {self.eta}, {self.errors} errors")
        return "; ".join([head, *(self.stage_text(n) for n in self.stages)])


class Progress:
    """Fed from two sides: `stages` (the board's snapshots, about once a second) and
    `committed` (each committed shard); `phase` names what the driver does before the board
    exists (starting Ray). `on_state` sees every new state (a caller's own display, tests)."""

    def __init__(self, total: int, done: int, interactive: bool | None = None, *, clock: Callable[[], float] = time.monotonic,
                 on_state: Callable[[ProgressState], None] | None = None):
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.clock, self.on_state = clock, on_state
        self._state = ProgressState("starting", total, done, done, 0, 0.0)
        self._start_done = done
        self._lock = threading.Lock()
        self._last_log: float | None = None
        self._logged_phase: str | None = None
        self._live: Any = None  # a rich Live, on a terminal
        self._relay: StderrRelay | None = None
        self._closed = False
        if self.interactive:
            self._start_live()

    def _start_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        if os.isatty(2):
            self._relay = StderrRelay()
            console = Console(file=os.fdopen(os.dup(self._relay.terminal), "w", buffering=1, encoding="utf-8", errors="replace"))
            self._relay.console = console
        else:  # asked for a bar without a terminal (a test, a captured run): nothing to relay
            console = Console(stderr=True)
        self._live = Live(console=console, get_renderable=self.render, refresh_per_second=4, redirect_stderr=True)
        self._live.start(refresh=True)

    def state(self) -> ProgressState:
        with self._lock:
            return self._state

    def _change(self, **changes) -> None:
        with self._lock:
            self._state = state = dataclasses.replace(self._state, **changes)
            now = self.clock()
            line = (not self.interactive and not self._closed
                    and (state.phase != self._logged_phase or self._last_log is None or now - self._last_log >= LOG_SECONDS))
            if line:
                self._logged_phase, self._last_log = state.phase, now
        # outside the lock: logging, rich's refresh thread and a caller's on_state take locks of their own
        if self.on_state is not None:
            self.on_state(state)
        if line:
            log.info("%s", state.line())

    def phase(self, name: str) -> None:
        self._change(phase=name)

    def stages(self, snap: BoardSnapshot) -> None:
        last = snap.last if snap.stages else None
        total = self.state().total
        self._change(phase=snap.phase, stages=dict(snap.stages), rate=last.rate if last else 0.0,
                     # a batch Ray ran twice (its actor died) counts twice: never past the total
                     finished=min(self._start_done + (last.done if last else 0), total))

    def committed(self, pairs: int, errors: int) -> None:
        self._change(committed=pairs, errors=errors)

    def render(self):
        """The bar and the stage lines, as rich draws them (Text cells: the console may print
        a relayed line with markup off, and the bar is drawn within that print)."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        s = self.state()
        head = Table.grid(padding=(0, 1))
        head.add_row(Text("genfleet"), Text(s.phase, style="bold"), ProgressBar(total=max(s.total, 1), completed=s.finished, width=30),
                     *(Text(t) for t in (f"{s.finished}/{s.total}", f"committed {s.committed}", f"{s.rate:.2f} rows/s", f"eta {s.eta}",
                                         f"errors {s.errors}")))
        rows = Table.grid(padding=(0, 2))
        for name, c in s.stages.items():
            rows.add_row(*(Text(t) for t in (f"  {name}", f"{c.done} done", f"{c.in_flight} in flight", f"{c.rate:.2f} rows/s",
                                              "loading" if c.loading else "")))
        return Group(head, rows)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._live is not None:
            live, self._live = self._live, None
            if self._relay is not None:
                self._relay.flush()  # what this process wrote before closing prints above the last bar
            live.stop()
            if self._relay is not None:
                self._relay.restore()
        else:
            log.info("%s", self.state().line())  # the final counts


class StderrRelay:
    """While the bar shows, this process's file descriptor 2 is a pipe whose lines a thread
    prints through the bar's console, above the bar. Python's sys.stderr alone would not do:
    logging handlers (genfleet's, Ray's) keep the stream they were made with, and Ray's C++
    core writes to the descriptor, so a raw line would tear the bar apart; this way every
    line of this process shows, errors included, and the bar stays whole. Processes started
    meanwhile (a local Ray's daemons) inherit the pipe: after the bar the thread goes on
    passing their lines straight to the terminal."""

    def __init__(self):
        self.terminal = os.dup(2)  # the real stderr, kept open for the thread
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.console: Any = None  # a rich Console on `terminal`: lines go through it while set
        self._pipe = os.fdopen(read, "rb")
        self._flushed = threading.Event()
        threading.Thread(target=self._pass, daemon=True, name="genfleet-stderr").start()

    def _pass(self) -> None:
        for line in iter(self._pipe.readline, b""):
            if line == FLUSH_MARK:
                self._flushed.set()
                continue
            console = self.console
            if console is not None:
                console.print(line.decode(errors="replace").rstrip("\n"), markup=False, highlight=False, emoji=False, soft_wrap=True)
            else:
                os.write(self.terminal, line)

    def flush(self) -> None:
        """Return once the lines written to fd 2 so far have been passed on (or after FLUSH_SECONDS)."""
        self._flushed.clear()
        os.write(2, FLUSH_MARK)
        self._flushed.wait(FLUSH_SECONDS)

    def restore(self) -> None:
        """fd 2 is the terminal again; what is still in the pipe, or comes later, passes raw."""
        self.console = None
        os.dup2(self.terminal, 2)
