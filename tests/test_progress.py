"""Live progress: the stages' counts (pipeline/progress.py), the display built on them
(pipeline/display.py), and a real job on local Ray whose shards commit only at its end
showing per-stage counts while a stage is held at a gate (tests/toy_family.py gate_dir)."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jobs.driver import run_job
from pipeline.display import LOG_SECONDS, Progress, ProgressState, duration
from pipeline.progress import RATE_WINDOW_SECONDS, StageBoard, StageEvent
from pipeline.resume import list_commits
from pipeline.spec import load_spec
from tests.conftest import ROOT, TOY, write_manifest


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def loaded_board(clock: Clock, todo: int) -> StageBoard:
    board = StageBoard(["noise", "shade"], todo, clock)
    for stage in ("noise", "shade"):
        board.add(StageEvent(stage, "loading"))
        board.add(StageEvent(stage, "loaded"))
    return board


def test_a_stage_rate_is_its_samples_over_the_recent_window():
    clock = Clock()
    board = loaded_board(clock, todo=100)
    board.add(StageEvent("shade", "started", 4))
    assert board.snapshot().stages["shade"].rate == 0.0  # nothing finished yet
    clock.now += 2
    board.add(StageEvent("shade", "finished", 4))
    board.add(StageEvent("shade", "started", 4))
    clock.now += 2
    shade = board.snapshot().stages["shade"]
    assert shade.done == 4 and shade.in_flight == 4 and shade.rate == 4 / 4  # 4 samples in the 4 s since the first start
    clock.now += 6  # stalled: the rate falls while it stalls
    assert board.snapshot().stages["shade"].rate == 4 / 10
    board.add(StageEvent("shade", "finished", 4))  # t=10 after the start: 8 done
    clock.now += RATE_WINDOW_SECONDS  # the window now starts after the first batch's finish, at its own point
    board.add(StageEvent("shade", "started", 20))
    board.add(StageEvent("shade", "finished", 20))
    assert board.snapshot().stages["shade"].rate == 20 / RATE_WINDOW_SECONDS


def test_phases_loading_generating_finishing():
    board = StageBoard(["noise", "shade"], todo=8, clock=Clock())
    assert board.snapshot().phase == "loading noise, shade"
    board.add(StageEvent("noise", "loading"))
    board.add(StageEvent("noise", "loaded"))
    board.add(StageEvent("shade", "loading"))
    assert board.snapshot().phase == "loading shade"
    board.add(StageEvent("noise", "started", 4))
    board.add(StageEvent("noise", "finished", 4))
    assert board.snapshot().phase == "loading shade"  # samples wait for the last stage's model
    board.add(StageEvent("shade", "loaded"))
    assert board.snapshot().phase == "generating"
    board.add(StageEvent("shade", "loading"))  # a replica added later
    board.add(StageEvent("shade", "started", 4))
    board.add(StageEvent("shade", "finished", 4))
    assert board.snapshot().phase == "generating (loading shade)"
    board.add(StageEvent("shade", "loaded"))
    board.add(StageEvent("shade", "started", 4))
    board.add(StageEvent("shade", "finished", 4))
    assert board.snapshot().phase == "finishing"


def test_eta_is_the_remaining_pairs_over_the_rate_shown(caplog):
    caplog.set_level(logging.INFO, logger="genfleet")
    clock = Clock()
    board = loaded_board(clock, todo=90)
    states: list[ProgressState] = []
    p = Progress(total=100, done=10, interactive=False, clock=clock, on_state=states.append)
    p.phase("starting Ray")
    board.add(StageEvent("shade", "started", 6))
    clock.now += 3
    board.add(StageEvent("shade", "finished", 6))
    board.add(StageEvent("shade", "started", 6))
    clock.now += 1
    p.stages(board.snapshot())
    p.committed(10, 2)  # a commit between two board reads keeps the stage counts
    s = p.state()
    assert s.finished == 10 + 6 and s.committed == 10 and s.errors == 2 and s.phase == "generating"
    assert s.rate == 6 / 4 and s.eta_seconds == (100 - 16) / (6 / 4)
    line = caplog.records[-1].getMessage()  # a new phase logs at once
    assert line.startswith("progress 16/100 generating, committed 10,") and f"{6 / 4:.2f} rows/s, eta {duration(84 / 1.5)}" in line
    assert "shade 6 done, 6 in flight, 1.50 rows/s" in line and "noise 0 done, 0 in flight, 0.00 rows/s" in line

    logged = len(caplog.records)
    clock.now += LOG_SECONDS / 2
    p.stages(board.snapshot())
    assert len(caplog.records) == logged  # the same phase: one line per LOG_SECONDS
    clock.now += LOG_SECONDS / 2
    p.stages(board.snapshot())
    assert len(caplog.records) == logged + 1
    p.close()
    assert caplog.records[-1].getMessage() == p.state().line()  # the final counts
    assert [s.phase for s in states][:2] == ["starting Ray", "generating"]


def test_live_bar_shows_the_same_facts():
    from rich.console import Console

    clock = Clock()
    board = loaded_board(clock, todo=40)
    board.add(StageEvent("noise", "started", 8))
    board.add(StageEvent("noise", "finished", 8))
    board.add(StageEvent("shade", "started", 8))
    clock.now += 2
    board.add(StageEvent("shade", "finished", 4))
    p = Progress(total=40, done=0, interactive=True, clock=clock)
    try:
        p.stages(board.snapshot())
        p.committed(0, 1)
        out = io.StringIO()
        Console(file=out, width=160).print(p.render())
        text = out.getvalue()
        assert "generating" in text and "4/40" in text and "committed 0" in text and "2.00 rows/s" in text
        assert f"eta {duration(36 / 2)}" in text and "errors 1" in text
        shade = next(line for line in text.splitlines() if line.strip().startswith("shade"))
        assert "4 done" in shade and "4 in flight" in shade and "2.00 rows/s" in shade
    finally:
        p.close()


BAR_CHILD = """
import logging, os, subprocess, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")  # a handler holding the stderr of before the bar
from pipeline.display import Progress
p = Progress(total=10, done=0)  # stderr is a terminal: a live bar
assert p.interactive
logging.getLogger("genfleet").error("genfleet says: shade failed")
os.write(2, b"a raw descriptor line\\n")  # as Ray's C++ core writes
subprocess.run(["sh", "-c", "echo a child process line >&2"], check=True)
p.close()
print("after the bar", file=sys.stderr)
"""


def test_lines_written_while_the_bar_shows_print_above_it():
    """A real terminal (a pty): each line this process writes to stderr, by any route, prints
    whole with the bar drawn again below it; after close, lines pass as they are."""
    master, slave = os.openpty()
    child = subprocess.Popen([sys.executable, "-c", BAR_CHILD], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "120"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait() == 0, out.decode(errors="replace")
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode())  # the terminal's control sequences
    lines = [line for line in re.split(r"\r\n|\r|\n", screen) if line.strip()]
    for message in ("genfleet says: shade failed", "a raw descriptor line", "a child process line"):
        at = lines.index(message)  # a line of its own, not torn into the bar's
        assert lines[at + 1].startswith("genfleet starting") and "0/10" in lines[at + 1], lines  # and the bar below it
    assert lines[-1] == "after the bar" and lines[-2].startswith("genfleet starting"), lines


GATE_AT = 8  # the gated sample's place: shade (batches of 4, one replica) has finished 8 when it waits
ROWS = [{"id": f"r{i:02d}", "prompt": "gate-1" if i == GATE_AT else f"p{i}", "num_samples": 2 if i == 11 else 1} for i in range(12)]
PAIRS = sum(r["num_samples"] for r in ROWS)


@pytest.fixture(scope="module")
def held_job(ray_cluster, tmp_path_factory):
    """A job whose shards commit only at its end, held at shade's gate: the states seen while
    it waits, then every state of the run and its result."""
    tmp = tmp_path_factory.mktemp("progress")
    gates = tmp / "gates"
    gates.mkdir()
    manifest = write_manifest(str(tmp / "m.parquet"), ROWS)
    out = str(tmp / "out")
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": manifest, "output": out},
                     ["stages.shade.device=cpu", "stages.shade.batch_size=4", "stages.noise.batch_size=4", "outputs.rows_per_shard=1024",
                      "outputs.max_shard_seconds=86400", f"stages.shade.options.gate_dir={gates}"])
    states: list[ProgressState] = []
    seen = threading.Condition()

    def on_state(s: ProgressState) -> None:
        with seen:
            states.append(s)
            seen.notify_all()

    outcome: dict = {}

    def run():
        try:
            outcome["result"] = run_job(spec, interactive=False, on_progress=on_state)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    job = threading.Thread(target=run, daemon=True)
    job.start()
    try:
        # wait until the board shows shade's work up to the gate and the gated batch started (reports
        # and reads are not ordered: a read can come before the start's report); the job ending first fails the test
        with seen:
            while not (Path(gates / "at-1").exists() and states and states[-1].stages.get("shade")
                       and states[-1].stages["shade"].done >= GATE_AT and states[-1].stages["shade"].in_flight > 0):
                assert job.is_alive(), outcome
                seen.wait(0.1)
            held = states[-1]
        commits_while_held = list_commits(out)
    finally:
        (gates / "open-1").touch()
    job.join()
    assert "error" not in outcome, outcome["error"]
    return held, commits_while_held, states, outcome["result"]


def test_stage_counts_show_before_the_first_commit(held_job):
    held, commits, _, _ = held_job
    assert commits == [] and held.committed == 0  # nothing committed yet ...
    shade, noise = held.stages["shade"], held.stages["noise"]
    assert shade.done == GATE_AT and shade.in_flight == 4  # ... yet the samples done by each stage show
    assert noise.done >= GATE_AT + 4 and not shade.loading and not noise.loading
    assert held.finished == GATE_AT and held.phase == "generating" and held.total == PAIRS


def test_stage_counts_at_the_end_are_the_pairs_and_phases_come_in_order(held_job):
    _, _, states, result = held_job
    assert result["status"] == "completed" and result["committed"] == PAIRS
    last = states[-1]
    assert {n: c.done for n, c in last.stages.items()} == {"noise": PAIRS, "shade": PAIRS}
    assert all(c.in_flight == 0 for c in last.stages.values())
    assert last.finished == last.committed == PAIRS
    phases = [s.phase for s in states]
    order = [phases.index(p) for p in ("starting Ray", "loading noise, shade", "generating")]
    assert order == sorted(order)
    assert phases[-1] == "finishing"  # the last read: every pair through shade
