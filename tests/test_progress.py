"""Progress display: a live bar on a terminal, plain log lines elsewhere."""

import logging

from pipeline.report import Progress


def test_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="genfleet")
    p = Progress(total=10, done=2, interactive=False)
    p.update(10, 1)
    p.close()
    line = caplog.records[-1].getMessage()
    assert line.startswith("progress 10/10,") and "1 errors" in line and "eta 0s" in line


def test_live_bar_tracks_pairs_and_errors():
    p = Progress(total=40, done=0, interactive=True)
    try:
        p.update(12, 1)
        task = p._bar.tasks[0]
        assert task.total == 40 and task.completed == 12 and task.fields["errors"] == 1
    finally:
        p.close()
