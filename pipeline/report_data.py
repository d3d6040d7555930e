"""What the HTML report shows, read from an output (running or finished, any fsspec URL).

It reads only what it needs: _job.json, _summary.json, the last runs' records in _runs/, the
commit records' stats, a few rows of errors/ (only from shards whose stats hold a kind still
lacking examples), the first rows of the images/ shards picked for the sample grid, and the
clip_score column.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.lease import read_lease
from pipeline.report import Tally, read_summary, stage_throughput
from pipeline.resume import Commit, NoJob, read_counts, read_job, read_results
from pipeline.runs import RunInfo, history, run_state
from pipeline.score_stats import describe
from pipeline.sink import image_bytes
from pipeline.storage import filesystem, join, redact

MAX_THUMBS = 48
THUMBS_PER_SHARD = 6  # so a full grid opens 8 shards at least: a spread, at a bounded cost
THUMB_PX = 128
EXAMPLES_PER_KIND = 3
MAX_SCORE_SHARDS = 64  # shards read for the clip_score histogram
MAX_MESSAGE_CHARS = 500
MAX_RUNS_SHOWN = 50  # the last runs in the runs table (a nightly job gathers hundreds)
IMAGE_COLUMNS = ("id", "sample_index", "image", "seed", "prompt", "sampler")
# sink images are written one page per column chunk, so a shard's image column is read whole;
# a buffered reader still stops early on files written with smaller pages
READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Thumb:
    id: str
    sample_index: int
    prompt: str | None
    seed: int | None
    sampler: str  # JSON, as in images/
    clip_score: float | None
    data_uri: str | None  # None: the image did not decode


@dataclass(frozen=True)
class ErrorExample:
    id: str
    sample_index: int
    stage: str
    message: str


@dataclass(frozen=True)
class ReportData:
    output: str  # redacted
    state: str
    generated_at: float
    job: dict  # _job.json
    counts: dict[str, int]
    errors_by_kind: dict[str, int]
    error_examples: dict[str, list[ErrorExample]]
    runs: list[RunInfo]  # the last MAX_RUNS_SHOWN; the last one's number is how many there were
    stage_rows_per_second: dict[str, float]
    stage_rows: dict[str, int]
    thumbs: list[Thumb]
    thumb_shards: int  # images/ shards the grid was drawn from
    clip_scores: list[float] | None  # None: no clip_score column
    clip_score_shards: tuple[int, int]  # (read, holding images)
    # count, mean, quantiles of every committed image's clip_score, from the commit stats (as in
    # _summary.json); None when the stats have none (outputs written before scores had them)
    clip_score_stats: dict | None = None


def spread_order(n: int) -> Iterator[int]:
    """0..n-1 in an order where every prefix is spread evenly (van der Corput): 0, n/2, n/4, 3n/4, ..."""
    seen: set[int] = set()
    k = 0
    while len(seen) < n:
        frac, denom, m = 0.0, 1.0, k
        while m:
            denom *= 2
            frac += (m & 1) / denom
            m >>= 1
        i = int(frac * n)
        if i not in seen:
            seen.add(i)
            yield i
        k += 1


def plan_sample(shards: list[tuple[str, int]], limit: int = MAX_THUMBS, per_shard: int = THUMBS_PER_SHARD) -> dict[str, int]:
    """How many images to take from the start of each shard ((name, images), sorted by name):
    up to `per_shard` from each in spread order, more per shard only when shards run out."""
    take: dict[str, int] = {}
    need = min(limit, sum(n for _, n in shards))
    while need > 0:
        for i in spread_order(len(shards)):
            name, n = shards[i]
            have = take.get(name, 0)
            add = min(per_shard - have, n - have, need)
            if add > 0:
                take[name] = have + add
                need -= add
            if need == 0:
                break
        per_shard += THUMBS_PER_SHARD
    return take


def thumbnail(data: bytes) -> str | None:
    """A small JPEG data URI, or None for bytes that are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # JPEG sources decode at a reduced size
            small = img.convert("RGB")
            small.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _read_rows(fs, path: str, columns: list[str], rows: int | None = None) -> pa.Table | None:
    """`columns` (those the file has) of its first `rows` rows (all: None); None if the file is gone
    (a shard retired or removed since its commit was listed)."""
    try:
        with fs.open(path, "rb") as fh:
            f = pq.ParquetFile(fh, buffer_size=READ_BUFFER, pre_buffer=False)
            present = [c for c in columns if c in f.schema_arrow.names]
            if rows is None:
                return f.read(columns=present)
            batch = next(f.iter_batches(batch_size=rows, columns=present), None)
            return pa.Table.from_batches([batch]) if batch is not None else f.schema_arrow.empty_table().select(present)
    except FileNotFoundError:
        return None


def read_thumbs(output: str, commits: list[Commit]) -> tuple[list[Thumb], int, bool]:
    """The sample grid, and whether images/ has a clip_score column."""
    fs, root = filesystem(output)
    shards = [(c.name, c.result.images) for c in sorted(commits, key=lambda c: c.name) if c.result.images > 0]
    plan = plan_sample(shards)
    thumbs: list[Thumb] = []
    has_score = False
    for name, n in sorted(plan.items()):
        table = _read_rows(fs, join(root, "images", f"{name}.parquet"), [*IMAGE_COLUMNS, "clip_score"], rows=n)
        if table is None:
            continue
        has_score = has_score or "clip_score" in table.column_names
        for row in table.to_pylist():
            thumbs.append(Thumb(row["id"], row["sample_index"], row["prompt"], row["seed"], row["sampler"] or "{}",
                                row.get("clip_score"), thumbnail(data) if (data := image_bytes(row["image"])) else None))
    return thumbs, len(plan), has_score


def read_clip_scores(output: str, commits: list[Commit]) -> tuple[list[float], int, int]:
    """clip_score values from a spread of at most MAX_SCORE_SHARDS images/ shards."""
    fs, root = filesystem(output)
    names = sorted(c.name for c in commits if c.result.images > 0)
    picked = sorted(names[i] for i in islice(spread_order(len(names)), MAX_SCORE_SHARDS))
    values: list[float] = []
    for name in picked:
        table = _read_rows(fs, join(root, "images", f"{name}.parquet"), ["clip_score"])
        if table is not None and table.num_columns:
            values += [v for v in table.column(0).to_pylist() if v is not None]
    return values, len(picked), len(names)


def read_error_examples(output: str, commits: list[Commit], per_kind: int = EXAMPLES_PER_KIND,
                        kinds: set[str] | None = None) -> dict[str, list[ErrorExample]]:
    """Up to `per_kind` rows of each permanent error kind (of `kinds`, or all), from as few
    errors/ files as the stats allow."""
    fs, root = filesystem(output)
    examples: dict[str, list[ErrorExample]] = {}
    for c in sorted(commits, key=lambda c: c.name):
        wanted = {k for k in c.result.errors_by_kind
                  if (kinds is None or k in kinds) and len(examples.get(k, [])) < per_kind}
        table = _read_rows(fs, join(root, "errors", f"{c.name}.parquet"), ["id", "sample_index", "stage", "kind", "message"]) \
            if wanted else None
        for row in table.to_pylist() if table is not None else []:
            got = examples.setdefault(row["kind"], []) if row["kind"] in wanted else None
            if got is not None and len(got) < per_kind:
                got.append(ErrorExample(row["id"], row["sample_index"], row["stage"], (row["message"] or "")[:MAX_MESSAGE_CHARS]))
    return examples


@dataclass(frozen=True)
class ErrorKind:
    """One kind of permanent error in an output: how many, and a few of its rows."""

    kind: str
    count: int
    examples: list[ErrorExample]


def read_errors(output: str, kind: str | None = None, per_kind: int = EXAMPLES_PER_KIND) -> list[ErrorKind]:
    """What `genfleet errors` shows: each kind (or just `kind`), most frequent first, counted from
    the commit stats (so retired errors and debris do not count) with examples from errors/."""
    if read_job(output) is None:
        raise NoJob(f"no genfleet job at {redact(output)} (no _job.json)")
    commits = read_results(output)
    counts = Tally.of(c.result for c in commits).errors_by_kind
    if kind is not None:
        counts = {kind: counts[kind]} if kind in counts else {}
    examples = read_error_examples(output, commits, per_kind, set(counts)) if per_kind > 0 and counts else {}
    return [ErrorKind(k, n, examples.get(k, [])) for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def gather(output: str) -> ReportData:
    job = read_job(output)
    if job is None:
        raise NoJob(f"no genfleet job at {redact(output)} (no _job.json)")
    summary = read_summary(output)  # None: running, or killed before its end
    commits, pending = read_counts(output)  # a transient failure is pending until a later shard holds its pair
    t = Tally.of(c.result for c in commits)
    thumbs, thumb_shards, has_score = read_thumbs(output, commits)
    scores, score_read, score_total = read_clip_scores(output, commits) if has_score else ([], 0, 0)
    now = time.time()
    lease = read_lease(output)
    counts = {"expected": job["expected_pairs"], "committed": t.pairs, "missing": max(job["expected_pairs"] - t.pairs, 0),
              "images": t.images, "texts": t.texts, "errors": t.errors, "retryable": pending, "shards": t.shards}
    return ReportData(
        output=redact(output), state=run_state(summary, lease), generated_at=now, job=job,
        counts=counts, errors_by_kind=dict(sorted(t.errors_by_kind.items())), error_examples=read_error_examples(output, commits),
        runs=history(output, job, commits, summary, lease, now, last=MAX_RUNS_SHOWN), stage_rows_per_second=stage_throughput(t),
        stage_rows=t.stage_rows,
        thumbs=thumbs, thumb_shards=thumb_shards, clip_scores=scores if has_score else None,
        clip_score_shards=(score_read, score_total), clip_score_stats=describe(t.score_stats).get("clip_score"))
