"""The stage runner: per-sample errors cost nothing extra, a raising batch is split, transient
failures are retried and then marked retryable (the toy family's real stages, no Ray)."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.family import StageContext
from pipeline.keys import KeySet
from pipeline.manifest import ORDINAL
from pipeline.rows import from_block
from pipeline.stages import StageRunner
from pipeline.validate import Expand
from tests import toy_family
from tests.conftest import TOY


def samples(prompts):
    table = pa.Table.from_pylist([{"id": f"s{i}", "prompt": p, ORDINAL: i} for i, p in enumerate(prompts)])
    expand = Expand(TOY, job_seed=0, sampler={}, max_prompt_chars=100, duplicates={}, committed=KeySet(np.zeros(0, np.uint64)), extras={})
    out = from_block(expand(table))
    StageRunner(TOY, "noise", StageContext("toy", "cpu", "float32")).run(out)
    return out


def shade(options=None, attempts=3):
    return StageRunner(TOY, "shade", StageContext("toy", "cpu", "float32", options or {}), attempts=attempts)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr("pipeline.stages.RETRY_BACKOFF_SECONDS", 0.0)
    toy_family.CALLS.clear()
    toy_family._FLAKY_SEEN.clear()


def test_a_returned_row_error_costs_one_batch():
    batch = samples(["ok"] * 3 + ["please reject"] + ["ok"] * 4)
    shade().run(batch)
    assert toy_family.CALLS["shade"] == 1
    assert [s.failure.kind if s.failure else "ok" for s in batch] == ["ok"] * 3 + ["rejected"] + ["ok"] * 4
    assert all(s.outputs.pixels is not None for s in batch if not s.failure)
    assert batch[3].state is None and batch[3].outputs.pixels is None and not batch[3].failure.retryable


def test_a_raising_batch_is_split_to_find_the_bad_sample():
    batch = samples(["ok"] * 5 + ["explode"] + ["ok"] * 2)
    shade().run(batch)
    assert toy_family.CALLS["shade"] == 1 + 8  # the batch, then each sample alone
    assert [s.failure.kind if s.failure else "ok" for s in batch] == ["ok"] * 5 + ["RuntimeError"] + ["ok"] * 2
    assert batch[5].failure.message == "boom on s5" and not batch[5].failure.retryable


def test_transient_failures_are_retried_then_marked_retryable():
    batch = samples(["ok", "flaky"])
    shade({"flaky_failures": 2}, attempts=3).run(batch)  # fails in the batch, then once alone, then works
    assert [s.failure for s in batch] == [None, None] and toy_family.CALLS["shade"] == 1 + 1 + 2
    toy_family._FLAKY_SEEN.clear()
    batch = samples(["flaky"])
    toy_family.CALLS.clear()
    shade({"flaky_failures": 10}, attempts=3).run(batch)
    assert batch[0].failure.kind == "ConnectionResetError" and batch[0].failure.retryable
    assert toy_family.CALLS["shade"] == 1 + 3  # the batch of one, then 3 attempts alone


def test_failed_samples_pass_by_and_inputs_are_dropped_when_no_later_stage_reads_them():
    batch = samples(["ok", "ok"])
    batch[0].fail("validate", "empty_prompt", "x")
    batch[1].inputs = {"image": b"bytes"}
    StageRunner(TOY, "shade", StageContext("toy", "cpu", "float32"), keep_inputs=False).run(batch)
    assert batch[0].outputs.pixels is None and batch[1].outputs.pixels is not None
    assert batch[1].inputs == {}
    assert set(batch[1].stage_seconds) == {"noise", "shade"}
