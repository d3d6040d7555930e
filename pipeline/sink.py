"""Writes finished samples as one output shard and commits it.

A shard is named from the keys it holds (so a retried write lands on the same names)
and is made of up to six files: images/, embeddings/, texts/, errors/, retries/
(Parquet) and webdataset/ (tar). Each file appears only complete; the commit record
`_commits/<shard>.parquet` (its keys, each key's status, and the shard's stats) is
written last. A shard without a commit record is debris of a crash.

Statuses: `ok` (outputs written), `error` (a permanent failure, in errors/), `retry`
(a transient failure, in retries/: not done, a later run makes it again).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.keys import pair_hashes, shard_name
from pipeline.sample import Sample
from pipeline.score_stats import BOUNDS, stats_of
from pipeline.storage import filesystem, join, write_atomic

DATASETS = ("images", "embeddings", "texts", "errors", "retries", "webdataset")
COMMITS = "_commits"
STATS_KEY = b"genfleet.stats"
_IMAGE_MIME_EXT = {"png": "png", "webp": "webp", "jpeg": "jpg"}
_SCORE_TYPES = {"float": pa.float64(), "float32": pa.float32(), "bool": pa.bool_()}
MAX_KEY_CHARS = 80  # webdataset keys (tar names must stay within USTAR's 100)
# The image column is Hugging Face's Image storage, struct<bytes, path> (path always null),
# declared as an Image feature in the schema metadata that `datasets` reads: it decodes the
# column to PIL images. `datasets` applies a declared feature only to a column of exactly
# the feature's Arrow type, so a plain binary column would load as raw bytes.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_FEATURES = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}
# columns the outputs write themselves: a manifest column of the same name is carried as extra_<name>
OUTPUT_COLUMNS = frozenset({"id", "sample_index", "image", "format", "width", "height", "seed", "sample_seed", "task",
                            "prompt", "negative_prompt", "family", "model", "sampler", "text", "stage", "kind", "message",
                            "retryable", "status"})


@dataclass(frozen=True)
class SinkConfig:
    output: str
    family: str
    model: str
    image_format: str = "png"
    webdataset: bool = False
    extra_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # output names and types of the extras
    scores: dict[str, str] = field(default_factory=dict)  # score column -> "float" | "float32" | "bool"
    lease_owner: str | None = None  # commit only while this run holds the output's lease
    # the manifest's files in order: (identity, first ordinal), so a commit says which file row each pair came from
    files: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ShardResult:
    """What one write task reports (and the commit record's stats)."""

    shard: str
    rows: int  # samples in the shard
    pairs: int  # manifest (id, sample) pairs accounted for: ok + permanent errors
    images: int
    texts: int
    errors: int  # permanent
    retryable: int  # transient failures, not done
    errors_by_kind: dict[str, int]  # permanent errors
    retryable_by_kind: dict[str, int]
    stage_seconds: dict[str, float]
    stage_rows: dict[str, int]
    committed_at: float
    score_stats: dict[str, dict] = field(default_factory=dict)  # score -> its distribution here (pipeline/score_stats.py)

    @classmethod
    def from_stats(cls, stats: dict) -> ShardResult:
        fields = cls.__dataclass_fields__
        return cls(**{k: stats.get(k, {} if k.endswith(("_kind", "_seconds", "_rows", "_stats")) else 0) for k in fields})


def status_of(s: Sample) -> str:
    if s.failure is None:
        return "ok"
    return "retry" if s.failure.retryable else "error"


def sample_key(row_id: str, sample_index: int) -> str:
    """A webdataset key: no dots or slashes (webdataset splits on them), bounded length."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", row_id)
    if safe != row_id or len(safe) > MAX_KEY_CHARS - 14:
        safe = safe[: MAX_KEY_CHARS - 23] + "-" + hashlib.sha1(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe}_{sample_index:04d}"


def _parquet_bytes(table: pa.Table, metadata: dict | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _keys(rows: list[Sample]) -> dict[str, pa.Array]:
    """The (id, sample_index) key columns every table of a shard starts with."""
    return {"id": pa.array([r.id for r in rows], pa.string()),
            "sample_index": pa.array([r.sample_index for r in rows], pa.int64())}


def _sampler(s: Sample) -> str:
    return json.dumps(s.params.model_dump(mode="json") if s.params is not None else {}, sort_keys=True)


def _model_columns(rows: list[Sample], cfg: SinkConfig) -> dict[str, pa.Array]:
    """Which model made a sample, and with which sampler settings."""
    return {"family": pa.array([cfg.family] * len(rows), pa.string()),
            "model": pa.array([cfg.model] * len(rows), pa.string()),
            "sampler": pa.array([_sampler(r) for r in rows], pa.string())}


def _extras(rows: list[Sample], schema: pa.Schema) -> dict[str, pa.Array]:
    return {f.name: pa.array([r.extras.get(f.name) for r in rows], f.type) for f in schema}


def _image_table(rows: list[Sample], cfg: SinkConfig) -> pa.Table:
    sizes = [r.outputs.image_size or (None, None) for r in rows]
    return pa.table({
        **_keys(rows),
        "image": image_array([r.outputs.image for r in rows]),
        "format": pa.array([cfg.image_format] * len(rows), pa.string()),
        "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
        "seed": pa.array([r.seed for r in rows], pa.int64()),
        "sample_seed": pa.array([r.sample_seed for r in rows], pa.int64()),
        "task": pa.array([r.task for r in rows], pa.string()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "negative_prompt": pa.array([r.negative_prompt for r in rows], pa.string()),
        **_model_columns(rows, cfg),
        **{name: pa.array([r.outputs.scores.get(name) for r in rows], _SCORE_TYPES[kind]) for name, kind in cfg.scores.items()},
        **_extras(rows, cfg.extra_schema),
    })


def image_array(images: list[bytes | None]) -> pa.StructArray:
    """Encoded images as the images table's `image` column (IMAGE_TYPE)."""
    data = pa.array(images, pa.binary())
    return pa.StructArray.from_arrays([data, pa.nulls(len(images), pa.string())], fields=list(IMAGE_TYPE), mask=data.is_null())


def image_bytes(value: dict | bytes | None) -> bytes | None:
    """The encoded image of an images-table cell (struct, or plain bytes as outputs of
    earlier versions hold)."""
    return value.get("bytes") if isinstance(value, dict) else value


def _embedding_table(rows: list[Sample]) -> pa.Table:
    """A 1-D embedding is a fixed-size float list (its size is the model's, so every shard
    agrees); an N-D one (e.g. a latent whose shape follows the image size) is flattened
    into a float list with its shape beside it in `<name>_shape`."""
    names = sorted({n for r in rows for n in r.outputs.embeddings})
    cols = _keys(rows)
    for n in names:
        vals = [None if r.outputs.embeddings.get(n) is None else np.asarray(r.outputs.embeddings[n], np.float32) for r in rows]
        present = [v for v in vals if v is not None]
        if all(v.ndim == 1 for v in present):
            sizes = {v.size for v in present}
            if len(sizes) != 1:
                raise ValueError(f"embedding {n!r} has sizes {sorted(sizes)}: a 1-D embedding must have one size")
            size = sizes.pop()
            flat = np.concatenate([np.zeros(size, np.float32) if v is None else v for v in vals])  # a null's slots are masked
            cols[n] = pa.FixedSizeListArray.from_arrays(pa.array(flat), size, mask=pa.array([v is None for v in vals]))
        else:
            cols[n] = pa.array([None if v is None else v.reshape(-1) for v in vals], pa.list_(pa.float32()))
            cols[f"{n}_shape"] = pa.array([None if v is None else list(v.shape) for v in vals], pa.list_(pa.int32()))
    return pa.table(cols)


def _text_table(rows: list[Sample], cfg: SinkConfig) -> pa.Table:
    return pa.table({
        **_keys(rows),
        "task": pa.array([r.task for r in rows], pa.string()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "text": pa.array([r.outputs.text for r in rows], pa.string()),
        **_model_columns(rows, cfg),
        **_extras(rows, cfg.extra_schema),
    })


def _error_table(rows: list[Sample]) -> pa.Table:
    failures = [r.failure for r in rows if r.failure is not None]
    return pa.table({
        **_keys(rows),
        "task": pa.array([r.task for r in rows], pa.string()),
        "stage": pa.array([f.stage for f in failures], pa.string()),
        "kind": pa.array([f.kind for f in failures], pa.string()),
        "message": pa.array([f.message for f in failures], pa.string()),
    })


def _webdataset_tar(rows: list[Sample], cfg: SinkConfig) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: same rows, same bytes
            tar.addfile(info, io.BytesIO(data))

        # one embedding per sample: {key}.npy, as img2dataset; several: {key}.{name}.npy
        single = len({n for r in rows for n in r.outputs.embeddings}) == 1
        for r in sorted(rows, key=lambda r: r.key):
            key = sample_key(r.id, r.sample_index)
            w, h = r.outputs.image_size or (None, None)
            meta = {**r.extras, "id": r.id, "sample_index": r.sample_index, "task": r.task, "prompt": r.prompt,
                    "seed": r.seed, "sample_seed": r.sample_seed, "width": w, "height": h, "family": cfg.family,
                    "model": cfg.model, "sampler": json.loads(_sampler(r)),
                    **{n: None for n in cfg.scores if n in BOUNDS}, **r.outputs.scores}  # a job score unset: null, as in images/
            add(f"{key}.{_IMAGE_MIME_EXT[cfg.image_format]}", r.outputs.image or b"")
            add(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
            for name, emb in sorted(r.outputs.embeddings.items()):
                npy = io.BytesIO()
                np.save(npy, np.asarray(emb, np.float32), allow_pickle=False)  # with its shape
                add(f"{key}.npy" if single else f"{key}.{name}.npy", npy.getvalue())
    return buf.getvalue()


def _result(name: str, rows: list[Sample]) -> ShardResult:
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {"error": {}, "retry": {}}
    for r in rows:
        for stage, s in r.stage_seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + s
            counts[stage] = counts.get(stage, 0) + 1
        if r.failure is not None:
            kinds = by_kind[status_of(r)]
            kinds[r.failure.kind] = kinds.get(r.failure.kind, 0) + 1
    status = [status_of(r) for r in rows]
    scored = {score: [v for r, st in zip(rows, status) if st == "ok" and (v := r.outputs.scores.get(score)) is not None]
              for score in BOUNDS}
    return ShardResult(
        shard=name, rows=len(rows),
        pairs=sum(r.covers for r, st in zip(rows, status) if st != "retry"),
        images=sum(1 for r, st in zip(rows, status) if st == "ok" and r.outputs.image is not None),
        texts=sum(1 for r, st in zip(rows, status) if st == "ok" and r.outputs.text is not None),
        errors=status.count("error"), retryable=status.count("retry"),
        errors_by_kind=by_kind["error"], retryable_by_kind=by_kind["retry"], stage_seconds=seconds, stage_rows=counts, committed_at=time.time(),
        score_stats={score: stats_of(score, values) for score, values in scored.items() if values})


def _placement(rows: list[Sample], files: tuple[tuple[str, int], ...]) -> dict[str, pa.Array]:
    """Which manifest file (its identity) and row each pair came from: a resumed run skips
    the row groups whose pairs are all done without reading them."""
    if not files:
        return {"file": pa.nulls(len(rows), pa.string()), "row": pa.nulls(len(rows), pa.int64())}
    ordinals = np.array([r.ordinal for r in rows], np.int64)
    known = ordinals >= 0
    starts = np.array([first for _, first in files], np.int64)
    which = np.clip(np.searchsorted(starts, ordinals, side="right") - 1, 0, len(files) - 1)
    names = np.array([identity for identity, _ in files], object)[which]
    return {"file": pa.array(names, pa.string(), mask=~known), "row": pa.array(ordinals - starts[which], pa.int64(), mask=~known)}


def write_shard(rows: list[Sample], cfg: SinkConfig) -> ShardResult | None:
    """Write one shard and, last, its commit record."""
    if not rows:
        return None
    fs, root = filesystem(cfg.output)
    name = shard_name(r.key for r in rows)
    status = {r.key: status_of(r) for r in rows}
    ok = [r for r in rows if status[r.key] == "ok"]
    images = [r for r in ok if r.outputs.image is not None]
    texts = [r for r in ok if r.outputs.text is not None]
    embedded = [r for r in ok if r.outputs.embeddings]
    errors = [r for r in rows if status[r.key] == "error"]
    retries = [r for r in rows if status[r.key] == "retry"]
    files = {
        "images": (images, lambda: _parquet_bytes(_image_table(images, cfg), HF_FEATURES), "parquet"),
        "embeddings": (embedded, lambda: _parquet_bytes(_embedding_table(embedded)), "parquet"),
        "texts": (texts, lambda: _parquet_bytes(_text_table(texts, cfg)), "parquet"),
        "errors": (errors, lambda: _parquet_bytes(_error_table(errors)), "parquet"),
        "retries": (retries, lambda: _parquet_bytes(_error_table(retries)), "parquet"),
        "webdataset": (images if cfg.webdataset else [], lambda: _webdataset_tar(images, cfg), "tar"),
    }
    for dataset, (subset, make, ext) in files.items():
        if subset:
            write_atomic(fs, join(root, dataset, f"{name}.{ext}"), make())
    result = _result(name, rows)
    if cfg.lease_owner is not None:
        from pipeline.lease import check  # (imports resume, which imports this module)

        check(cfg.output, cfg.lease_owner)  # a taken-over output gets no commits from this run
    keys = _keys(rows)
    commit = pa.table({**keys, "key": pa.array(pair_hashes(keys["id"], keys["sample_index"]), pa.uint64()),
                       "status": pa.array([status[r.key] for r in rows], pa.string()),
                       "covers": pa.array([r.covers for r in rows], pa.int32()),
                       "kind": pa.array([None if r.failure is None else r.failure.kind for r in rows], pa.string()),
                       **_placement(rows, cfg.files),
                       "content": pa.array([r.content for r in rows], pa.uint64())})  # the row's content hash
    write_atomic(fs, join(root, COMMITS, f"{name}.parquet"), _parquet_bytes(commit, {STATS_KEY: json.dumps(asdict(result)).encode()}))
    return result
