"""One pass over the manifest's ids before the job starts.

It finds duplicate ids (the first occurrence runs, later ones become errors), and counts
the expected (id, sample) pairs, per row group too (a resumed run skips row groups whose
pairs are all committed, without reading them). It reads only the `id` and `num_samples`
columns, row group by row group, in bulk (Arrow -> SipHash, no per-row Python), and keeps
9 bytes per row. What it learns of each file is cached in the output (`_plan/`, by the
file's identity), so a re-run reads only files it has not seen.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.keys import id_hashes
from pipeline.manifest import KEY_COLUMNS, Manifest, ManifestError, ManifestFile, read_group_columns
from pipeline.storage import filesystem, join, redact, write_atomic

MAX_SAMPLES_PER_ROW = 64
PLAN_DIR = "_plan"


def samples_of(value) -> int | None:
    """num_samples as an int, or None when it is not a usable count."""
    if value is None:
        return 1
    if isinstance(value, float) and (not np.isfinite(value) or value != int(value)):
        return None
    n = int(value)
    return n if 1 <= n <= MAX_SAMPLES_PER_ROW else None


def sample_counts(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """`samples_of` over a column, in bulk: a null is 1, an unusable count is 1 (its one error)."""
    v = pc.fill_null(column, 1).cast(pa.float64()).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(v) & (v == np.floor(v)) & (v >= 1) & (v <= MAX_SAMPLES_PER_ROW)
    return np.where(usable, v, 1).astype(np.int8)


@dataclass(frozen=True)
class FilePlan:
    """What the plan knows of one manifest file: each row's id hash and sample count."""

    identity: str
    hashes: np.ndarray  # uint64 per row
    samples: np.ndarray  # int8 per row
    cache_name: str  # its name in the cache (_cache_name)


@dataclass(frozen=True)
class Plan:
    num_rows: int
    expected_pairs: int  # sum of valid num_samples; an invalid row or a duplicate counts 1 (its error)
    # ordinal -> occurrence number (1 = second time the id appears, ...)
    duplicates: dict[int, int] = field(default_factory=dict)
    # file identity -> the pairs expected of each of its row groups
    group_pairs: dict[str, np.ndarray] = field(default_factory=dict)
    new_files: tuple[FilePlan, ...] = ()  # read by this plan, not cached yet


def _cache_name(manifest: Manifest, f: ManifestFile) -> str:
    """The file's identity; and, when the mapping moves id or num_samples, which columns were
    read as them: a plan of the file read through one mapping is not another's."""
    own = [manifest.own_name(c) for c in KEY_COLUMNS]
    if own == list(KEY_COLUMNS) or not f.identity:
        return f.identity
    return f"{f.identity}-{hashlib.blake2b(chr(31).join(own).encode(), digest_size=4).hexdigest()}"


def _read_file(manifest: Manifest, f: ManifestFile) -> FilePlan:
    cols = manifest.key_columns
    url = manifest.url_of(f)
    hashes, samples = [], []
    for _, t in read_group_columns(url, f, cols, manifest.columns):
        try:
            t.column("id").validate(full=True)
        except pa.ArrowInvalid as e:
            raise ManifestError(f"manifest file {redact(url)}: column '{manifest.own_name('id')}' is not valid UTF-8 ({e})") from None
        hashes.append(id_hashes(t.column("id")))
        samples.append(sample_counts(t.column("num_samples")) if "num_samples" in cols else np.ones(t.num_rows, np.int8))
    return FilePlan(f.identity, np.concatenate(hashes or [np.zeros(0, np.uint64)]), np.concatenate(samples or [np.zeros(0, np.int8)]),
                    _cache_name(manifest, f))


def _cache_path(root: str, name: str) -> str:
    return join(root, PLAN_DIR, f"{name}.parquet")


def _cached(output: str | None, manifest: Manifest, f: ManifestFile) -> FilePlan | None:
    if output is None or not f.identity:
        return None
    fs, root = filesystem(output)
    name = _cache_name(manifest, f)
    try:
        t = pq.read_table(io.BytesIO(fs.cat_file(_cache_path(root, name))))
    except (FileNotFoundError, OSError, pa.ArrowException):  # absent or damaged: read the file again
        return None
    if t.num_rows != f.num_rows:
        return None
    return FilePlan(f.identity, t.column("hash").to_numpy(), t.column("samples").to_numpy(), name)


def save_cache(output: str, plan: Plan) -> None:
    """Remember what this plan read (when the run really starts: a plan itself writes nothing)."""
    fs, root = filesystem(output)
    for fp in plan.new_files:
        if fp.identity:
            buf = io.BytesIO()
            pq.write_table(pa.table({"hash": fp.hashes, "samples": fp.samples}), buf, compression="zstd")
            write_atomic(fs, _cache_path(root, fp.cache_name), buf.getvalue())


def make_plan(manifest: Manifest, output: str | None = None) -> Plan:
    """The plan of `manifest`, reading only files `output`'s plan cache does not hold."""
    per_file, new = [], []
    for f in manifest.files:
        fp = _cached(output, manifest, f)
        if fp is None:
            fp = _read_file(manifest, f)
            new.append(fp)
        per_file.append(fp)
    h = np.concatenate([fp.hashes for fp in per_file])
    n = np.concatenate([fp.samples for fp in per_file]).astype(np.int64)
    o = np.arange(len(h), dtype=np.int64)  # ordinals: files in order, rows in order
    order = np.lexsort((o, h))  # group equal ids, in manifest order within a group
    hs = h[order]
    same_as_prev = np.zeros(len(hs), bool)
    same_as_prev[1:] = hs[1:] == hs[:-1]
    dups: dict[int, int] = {}
    run = 0
    for i in np.flatnonzero(same_as_prev):
        run = run + 1 if i > 0 and same_as_prev[i - 1] else 1
        dups[int(order[i])] = run
    if dups:  # a duplicate occurrence yields one error record, not its samples
        n[np.fromiter(dups.keys(), np.int64, len(dups))] = 1
    groups = {}
    for f in manifest.files:
        rows = n[f.first_ordinal: f.first_ordinal + f.num_rows]
        group_of_row = np.repeat(np.arange(len(f.row_groups)), f.row_groups)
        groups[f.identity] = np.bincount(group_of_row, weights=rows, minlength=len(f.row_groups)).astype(np.int64)
    return Plan(num_rows=len(h), expected_pairs=int(n.sum()), duplicates=dups, group_pairs=groups, new_files=tuple(new))
