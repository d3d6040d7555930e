"""Distribution of a bounded score (clip_score, 0 to 100) that merges across shards.

Each shard's commit stats carry, per score, its count, sum, min, max and counts in
100 equal bins over the score's range (only the bins it has: a few hundred bytes, in every
commit record and the commit index), so the summary and
`genfleet status` describe every committed image without reading images/: count, mean,
min and max exactly, quantiles (numpy's default definition) to within one bin: one point of
clip_score.
"""

from __future__ import annotations

import math

BOUNDS = {"clip_score": (0.0, 100.0)}  # the scores described, and their ranges
BINS = 100
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def stats_of(name: str, values: list[float]) -> dict:
    lo, hi = BOUNDS[name]
    width = (hi - lo) / BINS
    bins: dict[str, int] = {}  # bin number (a string: the stats travel as JSON) -> count
    for v in values:
        b = str(min(max(int((v - lo) / width), 0), BINS - 1))
        bins[b] = bins.get(b, 0) + 1
    return {"n": len(values), "sum": math.fsum(values), "min": min(values), "max": max(values), "bins": bins}


def merge(into: dict[str, dict], other: dict[str, dict]) -> None:
    for name, s in other.items():
        if not s.get("n"):
            continue
        have = into.get(name)
        if not have:
            into[name] = {**s, "bins": dict(s["bins"])}
            continue
        have["n"] += s["n"]
        have["sum"] += s["sum"]
        have["min"], have["max"] = min(have["min"], s["min"]), max(have["max"], s["max"])
        for b, c in s["bins"].items():
            have["bins"][b] = have["bins"].get(b, 0) + c


def _order_stat(name: str, s: dict, k: int) -> float:
    """The k-th smallest value (0-based): exact at the ends, else placed within its bin."""
    if k <= 0:
        return s["min"]
    if k >= s["n"] - 1:
        return s["max"]
    lo, hi = BOUNDS[name]
    width = (hi - lo) / BINS
    seen = 0
    for b, c in sorted((int(b), c) for b, c in s["bins"].items()):
        if seen + c > k:
            return min(max(lo + width * (b + (k - seen + 0.5) / c), s["min"]), s["max"])
        seen += c
    return s["max"]


def quantile(name: str, s: dict, q: float) -> float:
    """numpy's default (linear between the order statistics around (n - 1) * q), with each order
    statistic known to within its bin: so within one bin of the exact quantile."""
    h = (s["n"] - 1) * q
    k = math.floor(h)
    below = _order_stat(name, s, k)
    return below if k + 1 >= s["n"] else below + (h - k) * (_order_stat(name, s, k + 1) - below)


def describe(stats: dict[str, dict]) -> dict[str, dict]:
    """score name -> count, mean, min, p05 ... p95, max (rounded for reading)."""
    out = {}
    for name, s in sorted(stats.items()):
        if not s.get("n"):
            continue
        qs = {f"p{round(q * 100):02d}": round(quantile(name, s, q), 3) for q in QUANTILES}
        out[name] = {"count": s["n"], "mean": round(s["sum"] / s["n"], 3), "min": round(s["min"], 3), **qs, "max": round(s["max"], 3)}
    return out
