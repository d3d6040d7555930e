"""The write step: output blocks -> shards, committed by size or by age.

Ray Data's own write operator bundles rows for a Datasink by count only, so behind a
slow GPU stage a 1000-row shard would hold finished work for hours, all of it lost
in a crash. Here the driver streams the pipeline's output block references (never
the data), and hands a bundle to a write task as soon as it holds rows_per_shard
rows or its oldest block has waited max_shard_seconds. The Datasink's lifecycle is
kept as it is: on_write_start before the first write (when the first block arrives), `write` in each task,
on_write_complete with every result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import ray
from ray.data import Dataset
from ray.data.datasource import WriteResult

from jobs.ray_io import OutputDatasink
from jobs.resources import TASK_CPUS
from pipeline.outcome import JobStopped
from pipeline.sink import ShardResult

log = logging.getLogger("genfleet")
TICK_SECONDS = 0.25
MAX_WRITES_IN_FLIGHT = 4
DRAIN_SECONDS = 120.0  # a run that ends early waits this long for the shards already handed to write tasks


def _write(sink: OutputDatasink, *blocks) -> ShardResult | None:
    return sink.write(blocks, None)


class ShardWriter:
    """Drives one run's writes. `on_result(result) -> reason | None` sees each committed
    shard (progress, error-rate guard); a reason stops the run with JobStopped."""

    def __init__(self, sink: OutputDatasink, *, rows_per_shard: int, max_shard_seconds: float,
                 on_result: Callable[[ShardResult], str | None]):
        self.sink, self.rows_per_shard, self.max_age = sink, rows_per_shard, max_shard_seconds
        self.on_result = on_result
        self.results: list[ShardResult] = []
        self._task = ray.remote(_write).options(num_cpus=TASK_CPUS, max_retries=3, retry_exceptions=[OSError, ConnectionError, TimeoutError])
        self._sink_ref: ray.ObjectRef | None = None
        self._lock = threading.Lock()
        self._refs: list = []  # blocks waiting for their shard
        self._rows = 0
        self.received = 0  # rows the pipeline handed out this run (each through every stage)
        self._oldest: float | None = None
        self._in_flight: list = []
        self._stop: str | None = None
        self._error: BaseException | None = None

    def _flush(self) -> None:
        """Hand the buffered blocks to a write task (caller holds the lock)."""
        if self._refs:
            self._in_flight.append(self._task.remote(self._sink_ref, *self._refs))
            self._refs, self._rows, self._oldest = [], 0, None

    def _collect(self, timeout: float) -> None:
        with self._lock:
            pending = list(self._in_flight)
        if not pending:
            return
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        for ref in done:
            with self._lock:
                self._in_flight.remove(ref)
            result = ray.get(ref)
            if result is not None:
                self.results.append(result)
                self._stop = self._stop or self.on_result(result)

    def _drain(self) -> None:
        """A run that ends early (Ctrl-C, a stop, a failure) first collects the writes already
        handed out: a task may have committed its shard, and the run's summary counts it."""
        with self._lock:
            pending = list(self._in_flight)
        if not pending:
            return
        try:
            finished, _ = ray.wait(pending, num_returns=len(pending), timeout=DRAIN_SECONDS)
        except Exception as e:  # noqa: BLE001 - Ray itself is going (the run's own error says why)
            log.warning("could not collect the shard writes in flight: %s", e)
            return
        for ref in finished:
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the run is ending with its own error; this one is logged
                log.warning("a shard write failed while the run ended: %s", e)
                continue
            if result is not None:
                self.results.append(result)
                self.on_result(result)  # (counted; a stop reason no longer matters)
        with self._lock:
            self._in_flight = [r for r in self._in_flight if r not in finished]

    def _tick(self, done: threading.Event) -> None:
        while not done.is_set():
            try:
                with self._lock:
                    if self._oldest is not None and time.monotonic() - self._oldest >= self.max_age:
                        self._flush()
                self._collect(timeout=TICK_SECONDS)
            except BaseException as e:  # noqa: BLE001 - handed to the driver thread
                self._error = e
                return
            done.wait(TICK_SECONDS if not self._in_flight else 0)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stop is not None:
            raise JobStopped(self._stop)

    def _start(self) -> None:
        """The run really starts (the sink records it) when the first block is through every
        stage: a job whose models fail to load, or that cannot start, leaves no record behind."""
        if self._sink_ref is None:
            self.sink.on_write_start()
            self._sink_ref = ray.put(self.sink)

    def _consume(self, bundles) -> None:
        for bundle in bundles:
            self._check()
            self._start()
            with self._lock:
                for entry in bundle.blocks:
                    self._refs.append(entry.ref)
                    self._rows += entry.metadata.num_rows or 0
                    self.received += entry.metadata.num_rows or 0
                    self._oldest = self._oldest or time.monotonic()
                if self._rows >= self.rows_per_shard:
                    self._flush()
            while len(self._in_flight) > MAX_WRITES_IN_FLIGHT and self._error is None:
                time.sleep(TICK_SECONDS)

    def run(self, ds: Dataset) -> WriteResult:
        done = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(done,), daemon=True, name="genfleet-writer")
        ticker.start()
        try:
            bundles = ds.iter_internal_ref_bundles()
            try:
                self._consume(bundles)
            finally:
                bundles = None  # a pipeline left unfinished shuts down when its iterator goes
            self._start()  # (a pipeline that made no block: the run is recorded all the same)
            with self._lock:
                self._flush()
            while self._in_flight and self._error is None:
                time.sleep(TICK_SECONDS)
            if self._error is not None:
                raise self._error
        except BaseException as e:
            done.set()
            ticker.join()
            self._drain()
            self.sink.on_write_failed(e if isinstance(e, Exception) else RuntimeError(str(e)))
            raise
        finally:
            done.set()
            ticker.join()
        result: WriteResult[ShardResult | None] = WriteResult(num_rows=sum(r.rows for r in self.results), size_bytes=0,
                                                             write_returns=list(self.results))
        self.sink.on_write_complete(result)
        return result
