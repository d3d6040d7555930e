"""One streaming pass over the manifest's ids before the job starts.

It finds duplicate ids (the first occurrence runs, later ones become errors),
and counts the expected (id, sample) pairs for progress and status. It reads only
the `id` and `num_samples` columns and keeps 8 bytes per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.keys import id_hashes
from pipeline.manifest import ORDINAL, Manifest, ManifestError, read_file_rows
from pipeline.storage import redact

MAX_SAMPLES_PER_ROW = 64


@dataclass(frozen=True)
class Plan:
    num_rows: int
    expected_pairs: int  # sum of valid num_samples; an invalid row counts 1 (its error)
    # ordinal -> occurrence number (1 = second time the id appears, ...)
    duplicates: dict[int, int] = field(default_factory=dict)


def samples_of(value) -> int | None:
    """num_samples as an int, or None when it is not a usable count."""
    if value is None:
        return 1
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        return None
    n = int(value)
    return n if 1 <= n <= MAX_SAMPLES_PER_ROW else None


def make_plan(manifest: Manifest) -> Plan:
    hashes, ordinals, samples = [], [], []
    has_samples = "num_samples" in manifest.schema.names
    cols = ["id", "num_samples"] if has_samples else ["id"]
    for f in manifest.files:
        for t in read_file_rows(manifest.url_of(f), f, columns=cols):
            try:
                t.column("id").validate(full=True)
            except pa.ArrowInvalid as e:
                raise ManifestError(f"manifest file {redact(manifest.url_of(f))}: column 'id' is not valid UTF-8 ({e})") from None
            hashes.append(id_hashes(t.column("id").to_pylist()))
            ordinals.append(t.column(ORDINAL).to_numpy())
            counts = [samples_of(v) or 1 for v in t.column("num_samples").to_pylist()] if has_samples else [1] * t.num_rows
            samples.append(np.array(counts, np.int8))
    h = np.concatenate(hashes)
    o = np.concatenate(ordinals)
    n = np.concatenate(samples).astype(np.int64)
    order = np.lexsort((o, h))  # group equal ids, in manifest order within a group
    hs = h[order]
    same_as_prev = np.zeros(len(hs), bool)
    same_as_prev[1:] = hs[1:] == hs[:-1]
    dups: dict[int, int] = {}
    run = 0
    for i in np.flatnonzero(same_as_prev):
        run = run + 1 if i > 0 and same_as_prev[i - 1] else 1
        dups[int(o[order[i]])] = run
    # a duplicate occurrence yields one error record, not its samples
    dup_ordinals = np.fromiter(dups.keys(), np.int64, len(dups))
    expected = int(n.sum() - (n[np.searchsorted(o, dup_ordinals)].sum() if len(dups) else 0) + len(dups))
    return Plan(num_rows=len(h), expected_pairs=expected, duplicates=dups)
