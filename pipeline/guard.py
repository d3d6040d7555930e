"""Stop a job that is failing most of its rows instead of burning the cluster on it."""

from __future__ import annotations

from collections import deque

from pipeline.sink import ShardResult


class ErrorRateGuard:
    """Over the most recent `window` samples this run committed (whole shards, so a few
    more), the share that failed; `check` returns a one-line reason to stop once it
    passes `max_rate`. Nothing is judged before `window` samples are in."""

    def __init__(self, max_rate: float, window: int):
        self.max_rate, self.window = max_rate, window
        self.recent: deque[tuple[int, int, dict[str, int]]] = deque()  # (rows, failed, kinds)
        self.rows = self.failed = 0

    def add(self, r: ShardResult) -> None:
        failed = r.errors + r.retryable
        self.recent.append((r.rows, failed, {**r.errors_by_kind, **r.retryable_by_kind}))
        self.rows, self.failed = self.rows + r.rows, self.failed + failed
        while self.recent and self.rows - self.recent[0][0] >= self.window:
            rows, failed, _ = self.recent.popleft()
            self.rows, self.failed = self.rows - rows, self.failed - failed

    def check(self) -> str | None:
        if self.max_rate >= 1 or self.rows < self.window or self.failed <= self.max_rate * self.rows:
            return None
        kinds: dict[str, int] = {}
        for _, _, k in self.recent:
            for name, n in k.items():
                kinds[name] = kinds.get(name, 0) + n
        top = ", ".join(f"{k}={v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
        return (f"{self.failed} of the last {self.rows} samples failed ({self.failed / self.rows:.0%} > "
                f"errors.max_rate {self.max_rate:.0%}; most: {top}); see OUTPUT/errors/, fix the cause, run again")
