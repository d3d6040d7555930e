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
import pickle
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.keys import pair_hashes, shard_name
from pipeline.rows import Embeddings, from_block
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


class Rows:
    """A shard's samples as the block columns they travel in (pipeline/rows.py), with each
    row's pickled fields restored once (only extras and scores are read here)."""

    def __init__(self, table: pa.Table, rest: list[dict] | None = None, params: dict[bytes, str] | None = None):
        self.table = table
        if rest is None:
            packed = table.column("rest")
            rest = [{}] * len(packed) if packed.null_count == len(packed) else [{} if b is None else pickle.loads(b) for b in packed.to_pylist()]
        self.rest = rest  # (read only)
        self._sampler = params if params is not None else {}

    def __len__(self) -> int:
        return self.table.num_rows

    def subset(self, mask: np.ndarray) -> Rows:
        index = np.flatnonzero(mask)
        return Rows(self.table.take(pa.array(index, pa.int64())), [self.rest[i] for i in index], self._sampler)

    def column(self, name: str, type_: pa.DataType | None = None) -> pa.Array:
        col = self.table.column(name).combine_chunks()
        return col if type_ is None else col.cast(type_)

    def field(self, name: str) -> list:
        """One of the pickled fields, per row ({} where unset)."""
        return [r.get(name) or {} for r in self.rest]

    def samplers(self) -> pa.Array:
        """The sampler settings each sample was made with, as JSON (once per distinct params)."""
        out = []
        for blob in self.table.column("params").to_pylist():
            text = self._sampler.get(blob) if blob is not None else "{}"
            if text is None:
                text = self._sampler[blob] = json.dumps(pickle.loads(blob).model_dump(mode="json"), sort_keys=True)
            out.append(text)
        return pa.array(out, pa.string())


def _keys(rows: Rows) -> dict[str, pa.Array]:
    """The (id, sample_index) key columns every table of a shard starts with."""
    return {"id": rows.column("id", pa.string()), "sample_index": rows.column("sample_index", pa.int64())}


def _model_columns(rows: Rows, cfg: SinkConfig) -> dict[str, pa.Array]:
    """Which model made a sample, and with which sampler settings."""
    return {"family": pa.array([cfg.family] * len(rows), pa.string()),
            "model": pa.array([cfg.model] * len(rows), pa.string()),
            "sampler": rows.samplers()}


def _extras(rows: Rows, schema: pa.Schema) -> dict[str, pa.Array]:
    extras = rows.field("extras")
    return {f.name: pa.array([e.get(f.name) for e in extras], f.type) for f in schema}


def _image_table(rows: Rows, cfg: SinkConfig) -> pa.Table:
    scores = rows.field("scores")
    return pa.table({
        **_keys(rows),
        "image": image_array(rows.column("image", pa.binary())),
        "format": pa.array([cfg.image_format] * len(rows), pa.string()),
        "width": rows.column("image_width", pa.int32()),
        "height": rows.column("image_height", pa.int32()),
        "seed": rows.column("seed", pa.int64()),
        "sample_seed": rows.column("sample_seed", pa.int64()),
        "task": rows.column("task", pa.string()),
        "prompt": rows.column("prompt", pa.string()),
        "negative_prompt": rows.column("negative_prompt", pa.string()),
        **_model_columns(rows, cfg),
        **{name: pa.array([sc.get(name) for sc in scores], _SCORE_TYPES[kind]) for name, kind in cfg.scores.items()},
        **_extras(rows, cfg.extra_schema),
    })


def image_array(images: list[bytes | None] | pa.Array) -> pa.StructArray:
    """Encoded images as the images table's `image` column (IMAGE_TYPE)."""
    data = images if isinstance(images, pa.Array) else pa.array(images, pa.binary())
    return pa.StructArray.from_arrays([data, pa.nulls(len(images), pa.string())], fields=list(IMAGE_TYPE), mask=data.is_null())


def image_bytes(value: dict | bytes | None) -> bytes | None:
    """The encoded image of an images-table cell (struct, or plain bytes as outputs of
    earlier versions hold)."""
    return value.get("bytes") if isinstance(value, dict) else value


def _embedding_table(rows: Rows) -> pa.Table:
    """A 1-D embedding is a fixed-size float list (its size is the model's, so every shard
    agrees); an N-D one (e.g. a latent whose shape follows the image size) is flattened
    into a float list with its shape beside it in `<name>_shape`. Built from the block's
    flat buffer of embeddings (pipeline/rows.py), a name at a time."""
    e = Embeddings.of(rows.table.column("embeddings"))
    cols = _keys(rows)
    names = np.array(e.names, object)
    for n in sorted(set(e.names)):
        picked = np.flatnonzero(names == n)
        where = e.rows[picked]  # the rows that have it (a row has each name once)
        shapes = [e.shapes[k] for k in picked]
        if all(len(shape) == 1 for shape in shapes):
            sizes = {shape[0] for shape in shapes}
            if len(sizes) != 1:
                raise ValueError(f"embedding {n!r} has sizes {sorted(sizes)}: a 1-D embedding must have one size")
            size = sizes.pop()
            flat = np.zeros((len(rows), size), np.float32)  # a null's slots are masked
            flat[where] = e.values[e.starts[picked][:, None] + np.arange(size)]
            absent = np.ones(len(rows), bool)
            absent[where] = False
            cols[n] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size, mask=pa.array(absent))
        else:
            values: list[np.ndarray | None] = [None] * len(rows)
            kept: list[list[int] | None] = [None] * len(rows)
            for k, row in zip(picked.tolist(), where.tolist()):
                values[row], kept[row] = e.value(k).reshape(-1), e.shapes[k]
            cols[n] = pa.array(values, pa.list_(pa.float32()))
            cols[f"{n}_shape"] = pa.array(kept, pa.list_(pa.int32()))
    return pa.table(cols)


def _text_table(rows: Rows, cfg: SinkConfig) -> pa.Table:
    return pa.table({
        **_keys(rows),
        "task": rows.column("task", pa.string()),
        "prompt": rows.column("prompt", pa.string()),
        "text": rows.column("text", pa.string()),
        **_model_columns(rows, cfg),
        **_extras(rows, cfg.extra_schema),
    })


def _error_table(rows: Rows) -> pa.Table:
    return pa.table({
        **_keys(rows),
        "task": rows.column("task", pa.string()),
        "stage": rows.column("failure_stage", pa.string()),
        "kind": rows.column("failure_kind", pa.string()),
        "message": rows.column("failure_message", pa.string()),
    })


def _webdataset_tar(rows: list[Sample], cfg: SinkConfig) -> bytes:
    """(Per sample by nature: a tar member at a time.)"""
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
                    "model": cfg.model, "sampler": r.params.model_dump(mode="json") if r.params is not None else {},
                    **{n: None for n in cfg.scores if n in BOUNDS}, **r.outputs.scores}  # a job score unset: null, as in images/
            add(f"{key}.{_IMAGE_MIME_EXT[cfg.image_format]}", r.outputs.image or b"")
            add(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
            for name, emb in sorted(r.outputs.embeddings.items()):
                npy = io.BytesIO()
                np.save(npy, np.asarray(emb, np.float32), allow_pickle=False)  # with its shape
                add(f"{key}.npy" if single else f"{key}.{name}.npy", npy.getvalue())
    return buf.getvalue()


def _counts(values: pa.Array) -> dict[str, int]:
    return {} if len(values) == 0 else {v["values"]: v["counts"] for v in pc.value_counts(values).to_pylist()}


def _result(name: str, rows: Rows, status: np.ndarray) -> ShardResult:
    # (stage, seconds) of every sample (a map column's own keys/items would ignore a slice's offset)
    flat = pc.list_flatten(rows.column("stage_seconds", pa.list_(pa.struct([("key", pa.string()), ("value", pa.float64())]))))
    per_stage = pa.table({"stage": flat.field("key"), "s": flat.field("value")}).group_by("stage").aggregate([("s", "sum"), ("s", "count")])
    kinds = rows.column("failure_kind")
    ok = status == "ok"
    scores = rows.field("scores")
    scored = {score: [v for sc, good in zip(scores, ok) if good and (v := sc.get(score)) is not None] for score in BOUNDS}
    return ShardResult(
        shard=name, rows=len(rows),
        pairs=int(rows.column("covers").to_numpy()[status != "retry"].sum()),
        images=int((ok & rows.column("image").is_valid().to_numpy(zero_copy_only=False)).sum()),
        texts=int((ok & rows.column("text").is_valid().to_numpy(zero_copy_only=False)).sum()),
        errors=int((status == "error").sum()), retryable=int((status == "retry").sum()),
        errors_by_kind=_counts(kinds.filter(pa.array(status == "error"))), retryable_by_kind=_counts(kinds.filter(pa.array(status == "retry"))),
        stage_seconds=dict(zip(per_stage.column("stage").to_pylist(), per_stage.column("s_sum").to_pylist())),
        stage_rows=dict(zip(per_stage.column("stage").to_pylist(), per_stage.column("s_count").to_pylist())), committed_at=time.time(),
        score_stats={score: stats_of(score, values) for score, values in scored.items() if values})


def _placement(rows: Rows, files: tuple[tuple[str, int], ...]) -> dict[str, pa.Array]:
    """Which manifest file (its identity) and row each pair came from: a resumed run skips
    the row groups whose pairs are all done without reading them."""
    if not files:
        return {"file": pa.nulls(len(rows), pa.string()), "row": pa.nulls(len(rows), pa.int64())}
    ordinals = rows.column("ordinal").to_numpy()
    known = ordinals >= 0
    starts = np.array([first for _, first in files], np.int64)
    which = np.clip(np.searchsorted(starts, ordinals, side="right") - 1, 0, len(files) - 1)
    names = np.array([identity for identity, _ in files], object)[which]
    return {"file": pa.array(names, pa.string(), mask=~known), "row": pa.array(ordinals - starts[which], pa.int64(), mask=~known)}


def _status(rows: Rows) -> np.ndarray:
    """ok, error (permanent) or retry (transient), per row."""
    failed = rows.column("failure_kind").is_valid().to_numpy(zero_copy_only=False)
    retry = pc.fill_null(rows.column("failure_retryable"), False).to_numpy(zero_copy_only=False)
    return np.where(failed, np.where(retry, "retry", "error"), "ok")


def write_shard(block: pa.Table, cfg: SinkConfig) -> ShardResult | None:
    """Write one shard (a block of samples, pipeline/rows.py) and, last, its commit record."""
    if block.num_rows == 0:
        return None
    fs, root = filesystem(cfg.output)
    rows = Rows(block)
    keys = _keys(rows)
    name = shard_name(zip(keys["id"].to_pylist(), keys["sample_index"].to_pylist()))
    status = _status(rows)
    ok = status == "ok"
    images = rows.subset(ok & rows.column("image").is_valid().to_numpy(zero_copy_only=False))
    texts = rows.subset(ok & rows.column("text").is_valid().to_numpy(zero_copy_only=False))
    embedded = rows.subset(ok & (pc.fill_null(pc.list_value_length(rows.column("embeddings")), 0).to_numpy() > 0))
    errors, retries = rows.subset(status == "error"), rows.subset(status == "retry")
    files = {
        "images": (images, lambda: _parquet_bytes(_image_table(images, cfg), HF_FEATURES), "parquet"),
        "embeddings": (embedded, lambda: _parquet_bytes(_embedding_table(embedded)), "parquet"),
        "texts": (texts, lambda: _parquet_bytes(_text_table(texts, cfg)), "parquet"),
        "errors": (errors, lambda: _parquet_bytes(_error_table(errors)), "parquet"),
        "retries": (retries, lambda: _parquet_bytes(_error_table(retries)), "parquet"),
        "webdataset": (images if cfg.webdataset else Rows(block.slice(0, 0), []), lambda: _webdataset_tar(from_block(images.table), cfg), "tar"),
    }
    for dataset, (subset, make, ext) in files.items():
        if len(subset):
            write_atomic(fs, join(root, dataset, f"{name}.{ext}"), make())
    result = _result(name, rows, status)
    if cfg.lease_owner is not None:
        from pipeline.lease import check  # (imports resume, which imports this module)

        check(cfg.output, cfg.lease_owner)  # a taken-over output gets no commits from this run
    commit = pa.table({**keys, "key": pa.array(pair_hashes(keys["id"], keys["sample_index"]), pa.uint64()),
                       "status": pa.array(status, pa.string()),
                       "covers": rows.column("covers", pa.int32()),
                       "kind": rows.column("failure_kind", pa.string()),
                       **_placement(rows, cfg.files),
                       "content": rows.column("content", pa.uint64())})  # the row's content hash
    write_atomic(fs, join(root, COMMITS, f"{name}.parquet"), _parquet_bytes(commit, {STATS_KEY: json.dumps(asdict(result)).encode()}))
    return result
