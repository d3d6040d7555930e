"""Runs one family stage over batches, isolating rows that fail.

The stage's model is built once (in the actor's constructor) and stays resident.
Rows that failed earlier pass through untouched. If the stage raises for a
batch, the batch is retried row by row so good rows still land and only the
rows that raise on their own go to errors.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from pipeline.families import get_family
from pipeline.family import RowError, StageContext
from pipeline.rows import Row, fail, from_block, to_block
from pipeline.storage import redact

log = logging.getLogger(__name__)


def _error_kind(e: Exception) -> str:
    return e.kind if isinstance(e, RowError) else type(e).__name__


class StageRunner:
    """One stage over lists of rows."""

    def __init__(self, family: str, stage: str, ctx: StageContext):
        specs = {s.name: s for s in get_family(family).stages(ctx.model_path)}
        if stage not in specs:
            raise ValueError(f"family {family!r} has no stage {stage!r} (stages: {', '.join(specs)})")
        self.name = stage
        self.fn = specs[stage].build(ctx)

    def _apply(self, rows: list[Row]) -> None:
        outs = self.fn(rows)
        if len(outs) != len(rows):
            raise RuntimeError(f"stage {self.name} returned {len(outs)} rows for {len(rows)}")
        for row, out in zip(rows, outs):
            row.update(out)

    def _fail(self, row: Row, e: Exception) -> None:
        fail(row, self.name, _error_kind(e), redact(str(e)) or type(e).__name__)

    def run_rows(self, rows: list[Row]) -> list[Row]:
        live = [r for r in rows if "error" not in r]
        if not live:
            return rows
        start = time.perf_counter()
        try:
            self._apply(live)
        except Exception as batch_error:  # noqa: BLE001 - isolate the failing rows below
            if len(live) == 1:
                self._fail(live[0], batch_error)
            else:
                log.warning("stage %s failed for a batch of %d (%s); retrying row by row", self.name, len(live), type(batch_error).__name__)
                for row in live:
                    try:
                        self._apply([row])
                    except Exception as e:  # noqa: BLE001 - one row's failure is data
                        self._fail(row, e)
        per_row = (time.perf_counter() - start) / len(live)
        for row in live:
            row.setdefault("timings", {})[self.name] = per_row
        return rows



class StageGroup:
    """The batch function of one actor pool: one stage, or several consecutive
    stages sharing the actor (and its GPUs), run in order."""

    def __init__(self, family: str, stages: list[tuple[str, StageContext]]):
        self.runners = [StageRunner(family, name, ctx) for name, ctx in stages]

    def __call__(self, block: pa.Table) -> pa.Table:
        rows = from_block(block)
        for runner in self.runners:
            rows = runner.run_rows(rows)
        return to_block(rows)
