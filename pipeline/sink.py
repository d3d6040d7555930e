"""Writes finished rows as one output shard and commits it.

A shard is named from the keys it holds (so a retried write lands on the same
names) and is made of up to five files: images/, embeddings/, texts/, errors/
(Parquet) and webdataset/ (tar). Each file appears only complete; the commit
record `_commits/<shard>.parquet` (its keys and stats) is written last. A shard
without a commit record is debris of a crash and is removed before a resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.rows import Row
from pipeline.storage import filesystem, join, write_atomic

DATASETS = ("images", "embeddings", "texts", "errors", "webdataset")
COMMITS = "_commits"
STATS_KEY = b"genfleet.stats"
_IMAGE_MIME_EXT = {"png": "png", "webp": "webp", "jpeg": "jpg"}


@dataclass(frozen=True)
class SinkConfig:
    output: str
    family: str
    model: str
    image_format: str = "png"
    webdataset: bool = False
    extra_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))


def shard_name(rows: list[Row]) -> str:
    keys = sorted(f"{r['id']}\x1f{r['sample_index']}" for r in rows)
    return "part-" + hashlib.sha1("\x1e".join(keys).encode()).hexdigest()[:20]


def sample_key(row_id: str, sample_index: int) -> str:
    """A webdataset key: no dots or slashes (webdataset splits on them)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", row_id)
    if safe != row_id:
        safe += "-" + hashlib.sha1(row_id.encode()).hexdigest()[:8]
    return f"{safe}_{sample_index:04d}"


def _parquet_bytes(table: pa.Table, metadata: dict | None = None) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _keys(rows: list[Row]) -> dict[str, pa.Array]:
    """The (id, sample_index) key columns every table of a shard starts with."""
    return {"id": pa.array([r["id"] for r in rows], pa.string()),
            "sample_index": pa.array([r["sample_index"] for r in rows], pa.int64())}


def _model_columns(rows: list[Row], cfg: SinkConfig) -> dict[str, pa.Array]:
    """Which model made a row, and with which sampler settings."""
    return {"family": pa.array([cfg.family] * len(rows), pa.string()),
            "model": pa.array([cfg.model] * len(rows), pa.string()),
            "sampler": pa.array([json.dumps(r["params"], sort_keys=True) for r in rows], pa.string())}


def _extras(rows: list[Row], schema: pa.Schema) -> dict[str, pa.Array]:
    return {f.name: pa.array([r.get("extras", {}).get(f.name) for r in rows], f.type) for f in schema}


def _image_table(rows: list[Row], cfg: SinkConfig) -> pa.Table:
    cols = {
        **_keys(rows),
        "image": pa.array([r["image_bytes"] for r in rows], pa.binary()),
        "format": pa.array([cfg.image_format] * len(rows), pa.string()),
        "width": pa.array([r["width"] for r in rows], pa.int32()),
        "height": pa.array([r["height"] for r in rows], pa.int32()),
        "seed": pa.array([r["seed"] for r in rows], pa.int64()),
        "sample_seed": pa.array([r["sample_seed"] for r in rows], pa.int64()),
        "task": pa.array([r["task"] for r in rows], pa.string()),
        "prompt": pa.array([r.get("prompt") for r in rows], pa.string()),
        "negative_prompt": pa.array([r.get("negative_prompt") for r in rows], pa.string()),
        **_model_columns(rows, cfg),
    }
    return pa.table({**cols, **_extras(rows, cfg.extra_schema)})


def _embedding_table(rows: list[Row]) -> pa.Table:
    """A 1-D embedding is a fixed-size float list (its size is the model's, so every shard
    agrees); an N-D one (e.g. a latent whose shape follows the image size) is flattened
    into a float list with its shape beside it in `<name>_shape`."""
    names = sorted({n for r in rows for n in r["embeddings"]})
    cols = _keys(rows)
    for n in names:
        vals = [None if r["embeddings"].get(n) is None else np.asarray(r["embeddings"][n], np.float32) for r in rows]
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


def _text_table(rows: list[Row], cfg: SinkConfig) -> pa.Table:
    cols = {
        **_keys(rows),
        "task": pa.array([r["task"] for r in rows], pa.string()),
        "prompt": pa.array([r.get("prompt") for r in rows], pa.string()),
        "text": pa.array([r["text"] for r in rows], pa.string()),
        **_model_columns(rows, cfg),
    }
    return pa.table({**cols, **_extras(rows, cfg.extra_schema)})


def _error_table(rows: list[Row]) -> pa.Table:
    return pa.table({
        **_keys(rows),
        "task": pa.array([r.get("task") for r in rows], pa.string()),
        "stage": pa.array([r["error"]["stage"] for r in rows], pa.string()),
        "kind": pa.array([r["error"]["kind"] for r in rows], pa.string()),
        "message": pa.array([r["error"]["message"] for r in rows], pa.string()),
    })


def _webdataset_tar(rows: list[Row], cfg: SinkConfig) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: same rows, same bytes
            tar.addfile(info, io.BytesIO(data))

        # one embedding per sample: {key}.npy, as img2dataset; several: {key}.{name}.npy
        single = len({n for r in rows for n in (r.get("embeddings") or {})}) == 1
        for r in sorted(rows, key=lambda r: (r["id"], r["sample_index"])):
            key = sample_key(r["id"], r["sample_index"])
            meta = {"id": r["id"], "sample_index": r["sample_index"], "task": r["task"], "prompt": r.get("prompt"),
                    "seed": r["seed"], "sample_seed": r["sample_seed"], "width": r["width"], "height": r["height"],
                    "family": cfg.family, "model": cfg.model, "sampler": r["params"], **r.get("extras", {})}
            add(f"{key}.{_IMAGE_MIME_EXT[cfg.image_format]}", r["image_bytes"])
            add(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())
            for name, emb in sorted((r.get("embeddings") or {}).items()):
                npy = io.BytesIO()
                np.save(npy, np.asarray(emb, np.float32), allow_pickle=False)  # with its shape
                add(f"{key}.npy" if single else f"{key}.{name}.npy", npy.getvalue())
    return buf.getvalue()


def _stats(rows: list[Row], errors: list[Row]) -> dict:
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in rows:
        for stage, s in (r.get("timings") or {}).items():
            seconds[stage] = seconds.get(stage, 0.0) + s
            counts[stage] = counts.get(stage, 0) + 1
    by_kind: dict[str, int] = {}
    for r in errors:
        by_kind[r["error"]["kind"]] = by_kind.get(r["error"]["kind"], 0) + 1
    return {
        "rows": len(rows),
        "pairs": sum(r.get("covers", 1) for r in rows),  # manifest pairs accounted for
        "images": sum(1 for r in rows if "error" not in r and r.get("image_bytes") is not None),
        "texts": sum(1 for r in rows if "error" not in r and r.get("text") is not None),
        "errors": len(errors),
        "errors_by_kind": by_kind,
        "stage_seconds": seconds,
        "stage_rows": counts,
        "committed_at": time.time(),
    }


def write_shard(rows: list[Row], cfg: SinkConfig) -> dict:
    """Write one shard and its commit record; returns the shard's stats."""
    if not rows:
        return {"shard": None, "rows": 0}
    fs, root = filesystem(cfg.output)
    name = shard_name(rows)
    errors = [r for r in rows if "error" in r]
    ok = [r for r in rows if "error" not in r]
    images = [r for r in ok if r.get("image_bytes") is not None]
    texts = [r for r in ok if r.get("text") is not None]
    embedded = [r for r in ok if r.get("embeddings")]
    files = {
        "images": (images, lambda: _parquet_bytes(_image_table(images, cfg)), "parquet"),
        "embeddings": (embedded, lambda: _parquet_bytes(_embedding_table(embedded)), "parquet"),
        "texts": (texts, lambda: _parquet_bytes(_text_table(texts, cfg)), "parquet"),
        "errors": (errors, lambda: _parquet_bytes(_error_table(errors)), "parquet"),
        "webdataset": (images if cfg.webdataset else [], lambda: _webdataset_tar(images, cfg), "tar"),
    }
    for dataset, (subset, make, ext) in files.items():
        if subset:
            write_atomic(fs, join(root, dataset, f"{name}.{ext}"), make())
    stats = {"shard": name, **_stats(rows, errors)}
    commit = pa.table({
        **_keys(rows),
        "status": pa.array(["error" if "error" in r else "ok" for r in rows], pa.string()),
    })
    write_atomic(fs, join(root, COMMITS, f"{name}.parquet"), _parquet_bytes(commit, {STATS_KEY: json.dumps(stats).encode()}))
    return stats
