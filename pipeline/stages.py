"""Runs a family's stages over batches of samples.

The stage's model is built once (in the actor's constructor) and stays resident.
Failed samples pass by. A stage answers each sample with a Result or a RowError; only
when it raises for a whole batch is the batch re-run sample by sample, to find the
ones that fail. An unexpected exception is that sample's error: permanent, or, when
transient (CUDA out of memory, storage, network), retried here a few times with
backoff and then recorded as retryable, for a later run to try again.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from functools import partial

import pyarrow as pa

from pipeline.families import get_family
from pipeline.family import StageContext, StageFn
from pipeline.progress import Report, StageEvent
from pipeline.retry import is_transient
from pipeline.rows import map_samples
from pipeline.sample import Result, RowError, Sample
from pipeline.storage import redact

log = logging.getLogger(__name__)
RETRY_BACKOFF_SECONDS = 0.5


class StageRunner:
    """One stage over lists of samples."""

    def __init__(self, family: str, stage: str, ctx: StageContext, *, keep_inputs: bool = True, attempts: int = 3,
                 build: Callable[[StageContext], StageFn] | None = None):
        """`build`: a stage of the job's own (the score stage, pipeline/scoring.py) instead of the family's `stage`."""
        if build is None:
            specs = {s.name: s for s in get_family(family).stages(ctx.model_path)}
            if stage not in specs:
                raise ValueError(f"family {family!r} has no stage {stage!r} (stages: {', '.join(specs)})")
            build = specs[stage].build
        self.name, self.keep_inputs, self.attempts = stage, keep_inputs, max(1, attempts)
        self.fn = build(ctx)

    def _call(self, samples: list[Sample]) -> list[Result | RowError]:
        results = self.fn(samples)
        if len(results) != len(samples):
            raise RuntimeError(f"stage {self.name} returned {len(results)} results for {len(samples)} samples")
        for r in results:
            if not isinstance(r, (Result, RowError)):
                raise TypeError(f"stage {self.name} returned {type(r).__name__}, not a Result or RowError")
        return results

    @staticmethod
    def _as_error(e: Exception) -> RowError:
        if isinstance(e, RowError):
            return e
        return RowError(type(e).__name__, redact(str(e)) or type(e).__name__, retryable=is_transient(e))

    def _alone(self, sample: Sample) -> Result | RowError:
        for attempt in range(self.attempts):
            try:
                return self._call([sample])[0]
            except Exception as e:  # noqa: BLE001 - one sample's failure is data
                if isinstance(e, RowError) or not is_transient(e) or attempt + 1 >= self.attempts:
                    return self._as_error(e)
                time.sleep(RETRY_BACKOFF_SECONDS * 2**attempt)
        raise AssertionError("unreachable")

    def run(self, samples: list[Sample]) -> None:
        live = [s for s in samples if s.failure is None]
        if not live:
            return
        start = time.perf_counter()
        try:
            results = self._call(live)
        except Exception as e:  # noqa: BLE001 - find the failing samples below
            if len(live) > 1:
                log.warning("stage %s raised for a batch of %d (%s); running it sample by sample", self.name, len(live), type(e).__name__)
                results = [self._alone(s) for s in live]
            elif isinstance(e, RowError) or not is_transient(e):
                results = [self._as_error(e)]
            else:
                results = [self._alone(live[0])]
        per_sample = (time.perf_counter() - start) / len(live)
        for s, r in zip(live, results):
            if isinstance(r, RowError):
                s.fail(self.name, r.kind, redact(str(r)) or r.kind, r.retryable)
            else:
                s.apply(r)
                if not self.keep_inputs:
                    s.inputs = {}
            s.stage_seconds[self.name] = per_sample


class StageGroup:
    """The batch function of one actor pool: one stage, or several consecutive stages
    sharing the actor (and its GPUs), run in order.
    stages: (name, context, keep_inputs: a later stage still reads Sample.inputs)."""

    def __init__(self, family: str, stages: list[tuple[str, StageContext, bool]], attempts: int = 3,
                 report: Report | None = None):
        """`report`: where this replica says how far it is (pipeline/progress.py), or nowhere."""
        self.report = report
        self.runners = [loaded(name, partial(StageRunner, family, name, ctx, keep_inputs=keep, attempts=attempts), report)
                        for name, ctx, keep in stages]

    def __call__(self, block: pa.Table) -> pa.Table:
        return map_samples(block, self.run)

    def run(self, samples: list[Sample], batch_size: int | None = None) -> None:
        """`batch_size`: cut the samples into batches of that size for each stage (reported
        once for all of them); None: they are one batch."""
        for runner in self.runners:
            run_reported(runner, samples, self.report, batch_size)


def loaded(stage: str, build: Callable[[], StageRunner], report: Report | None) -> StageRunner:
    """Build a stage's runner (its model), reporting the load's start and end."""
    if report is not None:
        report(StageEvent(stage, "loading"))
    runner = build()
    if report is not None:
        report(StageEvent(stage, "loaded"))
    return runner


def run_reported(runner: StageRunner, samples: list[Sample], report: Report | None, batch_size: int | None = None) -> None:
    """Run one stage over samples (in batches of `batch_size`, or as one), reporting them
    started and finished (every sample: a failed one has passed this stage too)."""
    if report is not None:
        report(StageEvent(runner.name, "started", len(samples)))
    step = batch_size or max(len(samples), 1)
    for i in range(0, len(samples), step):
        runner.run(samples[i: i + step])
    if report is not None:
        report(StageEvent(runner.name, "finished", len(samples)))


# the stage group this worker process built for stages run in tasks: (its arguments, the group)
_in_task: tuple[tuple[bytes, Report | None], StageGroup] | None = None


def run_in_task(block: pa.Table, *, family: str, stages: list[tuple[str, StageContext, bool]], batch_size: int,
                attempts: int = 3, report: Report | None = None) -> pa.Table:
    """The block function of stages that keep no model (StageSpec.resident False), run in plain
    tasks: built once per worker process and job (a worker runs one job's tasks at a time, so
    only the last group built is kept; `report` tells one job's from the next), then run over the
    block's samples in batches of `batch_size`, reported once per block. The block is cut here,
    not by Ray Data: a map step that asks Ray for batches is never fused with the read before it."""
    global _in_task
    key = (pickle.dumps((family, stages, attempts)), report)
    if _in_task is None or _in_task[0] != key:
        _in_task = (key, StageGroup(family, stages, attempts, report))
    group = _in_task[1]
    return map_samples(block, lambda samples: group.run(samples, batch_size))
