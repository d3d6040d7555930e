"""How samples travel between steps: one sample per block row, its fields as Arrow columns.

One sample per row, so that Ray forms every model batch exactly as it forms batches of
rows (batch composition can change a model's low bits, and the same manifest must give
the same bytes). The fields the runner owns are plain columns, built and read a column at a
time; embeddings travel as float32 in one flat buffer per block (`EMBEDDINGS`), as the sink
writes them; only what has no fixed shape (the family's state, inputs, extras, pixels,
scores) is pickled, per row, and only when the row has any: a freshly validated sample
carries none. A sample's params are pickled once per distinct object in a block and
restored once per distinct value (they are immutable, so samples may share one). Pickle is
safe here: these bytes are made by this job's own steps a moment earlier and are never
written to storage or read from a user.

Measured with a trivial stage (bench/bench_scale.py), moving samples as packs of pickled
`Sample` objects took about half of the machinery's time, and pickling each sample's
embedding (a small numpy array) a quarter of what was left; see BENCHMARKS.md.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.gcpause import gc_paused
from pipeline.sample import Failure, Outputs, Sample

# a sample's embeddings: (name, shape, float32 values) per embedding
EMBEDDING = pa.struct([("name", pa.string()), ("shape", pa.list_(pa.int32())), ("values", pa.large_list(pa.float32()))])
EMBEDDINGS = pa.list_(EMBEDDING)
SCHEMA = pa.schema([
    ("id", pa.string()), ("sample_index", pa.int64()), ("task", pa.string()), ("prompt", pa.large_string()),
    ("negative_prompt", pa.large_string()), ("seed", pa.int64()), ("sample_seed", pa.int64()), ("width", pa.int32()),
    ("height", pa.int32()), ("covers", pa.int32()), ("ordinal", pa.int64()), ("content", pa.uint64()),
    ("params", pa.large_binary()),
    ("failure_stage", pa.string()), ("failure_kind", pa.string()), ("failure_message", pa.large_string()),
    ("failure_retryable", pa.bool_()),
    ("image", pa.large_binary()), ("image_width", pa.int32()), ("image_height", pa.int32()), ("text", pa.large_string()),
    ("stage_seconds", pa.map_(pa.string(), pa.float64())),
    ("embeddings", EMBEDDINGS),
    ("has_pixels", pa.bool_()),  # lets a step that only handles pixels (encoding) pass a block without reading it
    ("rest", pa.large_binary()),  # pickled {field: value} of the fields below that are set, or null
])
PLAIN = ("id", "sample_index", "task", "prompt", "negative_prompt", "seed", "sample_seed", "width", "height", "covers",
         "ordinal", "content")
REST = ("inputs", "extras", "state", "pixels", "scores")  # empty ones are left out


def _rest(s: Sample) -> bytes | None:
    o = s.outputs
    if not (s.inputs or s.extras or s.state is not None or o.pixels is not None or o.scores):
        return None  # (most samples after the last stage: nothing to build)
    values = (("inputs", s.inputs), ("extras", s.extras), ("state", s.state), ("pixels", o.pixels), ("scores", o.scores))
    kept = {k: v for k, v in values if v is not None and not (type(v) is dict and not v)}
    return pickle.dumps(kept, protocol=5) if kept else None


def _params(samples: list[Sample]) -> list[bytes | None]:
    """Each sample's params pickled, once per distinct object."""
    memo: dict[int, bytes] = {}
    out: list[bytes | None] = []
    for s in samples:
        p = s.params
        if p is None:
            out.append(None)
            continue
        blob = memo.get(id(p))
        if blob is None:
            blob = memo[id(p)] = pickle.dumps(p, protocol=5)
        out.append(blob)
    return out


def embeddings_array(per_sample: list[dict[str, Any]]) -> pa.ListArray:
    """Each sample's embeddings (name -> array of any shape) as float32, in one flat buffer."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    flat: list[np.ndarray] = []
    counts = np.zeros(len(per_sample) + 1, np.int32)
    for i, e in enumerate(per_sample):
        if not e:
            continue
        counts[i + 1] = len(e)
        for name, value in e.items():
            a = np.asarray(value, np.float32)
            names.append(name)
            shapes.append(a.shape)
            flat.append(a.reshape(-1))
    sizes = np.zeros(len(flat) + 1, np.int64)
    sizes[1:] = [a.size for a in flat]
    values = pa.LargeListArray.from_arrays(pa.array(np.cumsum(sizes)), pa.array(np.concatenate(flat) if flat else np.zeros(0, np.float32)))
    entries = pa.StructArray.from_arrays([pa.array(names, pa.string()), pa.array(shapes, pa.list_(pa.int32())), values], fields=list(EMBEDDING))
    return pa.ListArray.from_arrays(pa.array(np.cumsum(counts)), entries)


@dataclass(frozen=True)
class Embeddings:
    """A block's embeddings column, read back: entry k is embedding `names[k]` of row `rows[k]`."""

    rows: np.ndarray
    names: list[str]
    shapes: list[list[int]]
    starts: np.ndarray  # entry k's values: values[starts[k]: starts[k] + size of its shape]
    values: np.ndarray  # float32

    @classmethod
    def of(cls, column: pa.Array | pa.ChunkedArray) -> Embeddings:
        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        names, shapes, values = col.flatten().flatten()
        lengths = values.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        return cls(col.value_parent_indices().to_numpy(), names.to_pylist(), shapes.to_pylist(), starts,
                   values.flatten().to_numpy(zero_copy_only=False))

    def value(self, k: int) -> np.ndarray:
        shape = self.shapes[k]
        start = int(self.starts[k])
        return self.values[start: start + int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def per_row(self, n: int) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
        for k, (row, name) in enumerate(zip(self.rows.tolist(), self.names)):
            out[row][name] = self.value(k)
        return out


def to_block(samples: list[Sample], kept: pa.Table | None = None) -> pa.Table:
    """`kept`: the block the samples were read from, whose columns of the runner's own
    fields (PLAIN) are taken as they are: no step changes them."""
    failures = [s.failure for s in samples]
    sizes = [s.outputs.image_size for s in samples]
    columns: dict[str, Any] = {name: kept.column(name).combine_chunks() if kept is not None else [getattr(s, name) for s in samples]
                               for name in PLAIN}
    columns.update({
        "params": _params(samples),
        "failure_stage": [f and f.stage for f in failures],
        "failure_kind": [f and f.kind for f in failures],
        "failure_message": [f and f.message for f in failures],
        "failure_retryable": [f and f.retryable for f in failures],
        "image": [s.outputs.image for s in samples],
        "image_width": [z and z[0] for z in sizes],
        "image_height": [z and z[1] for z in sizes],
        "text": [s.outputs.text for s in samples],
        "stage_seconds": [list(s.stage_seconds.items()) for s in samples],
        "embeddings": embeddings_array([s.outputs.embeddings for s in samples]),
        "has_pixels": [s.outputs.pixels is not None for s in samples],
        "rest": [_rest(s) for s in samples],
    })
    return pa.table([c if isinstance(c := columns[f.name], pa.Array) else pa.array(c, f.type) for f in SCHEMA], schema=SCHEMA)


def fresh_block(columns: dict[str, pa.Array]) -> pa.Table:
    """A block of freshly validated samples from their columns (as to_block makes it): the
    runner's fields given, nothing failed, made or pickled yet."""
    n = len(columns["id"])
    empty = np.zeros(n + 1, np.int32)
    blank = {  # (the other columns: nulls)
        "stage_seconds": pa.MapArray.from_arrays(empty, pa.array([], pa.string()), pa.array([], pa.float64())),
        "embeddings": pa.ListArray.from_arrays(empty, embeddings_array([]).values),
        "has_pixels": pa.array(np.zeros(n, bool)),
    }
    return pa.table([columns[f.name].cast(f.type) if f.name in columns else blank.get(f.name, pa.nulls(n, f.type))
                     for f in SCHEMA], schema=SCHEMA)


def has_pixels(block: pa.Table) -> bool:
    return "has_pixels" in block.column_names and bool(pc.any(block.column("has_pixels")).as_py())


def _column(block: pa.Table, name: str) -> list:
    col = block.column(name)
    if col.null_count == len(col):  # (most of a fresh block's columns: no failure, image, text yet)
        return [None] * len(col)
    return col.to_pylist()


def from_block(block: pa.Table) -> list[Sample]:
    if "id" not in block.column_names:  # Ray hands on empty blocks without columns
        return []
    c = {name: _column(block, name) for name in SCHEMA.names if name != "embeddings"}
    embeddings = Embeddings.of(block.column("embeddings")).per_row(block.num_rows)
    params: dict[bytes, Any] = {}
    samples = []
    failures = zip(c["failure_stage"], c["failure_kind"], c["failure_message"], c["failure_retryable"])
    images = zip(c["image"], c["image_width"], c["image_height"], c["text"])
    for (id_, index, task, prompt, negative, seed, sample_seed, width, height, covers, ordinal, content), blob, \
            (stage, kind, message, retryable), (image, w, h, text), seconds, packed, embedded in zip(
            zip(*(c[name] for name in PLAIN)), c["params"], failures, images, c["stage_seconds"], c["rest"], embeddings):
        if blob is not None and blob not in params:
            params[blob] = pickle.loads(blob)
        rest = pickle.loads(packed) if packed is not None else {}
        outputs = Outputs(rest.get("pixels"), image, None if w is None else (w, h), embedded, text, rest.get("scores", {}))
        samples.append(Sample(id_, index, task, prompt, negative, seed, sample_seed, width, height, None if blob is None else params[blob],
                              rest.get("inputs", {}), rest.get("extras", {}), rest.get("state"), outputs,
                              None if kind is None else Failure(stage, kind, message, retryable), covers, ordinal, content,
                              dict(seconds) if seconds else {}))
    return samples


def concat_blocks(blocks: Iterable[pa.Table]) -> pa.Table:
    """Blocks as one table of samples (empty blocks Ray hands on without columns left out)."""
    return pa.concat_tables([SCHEMA.empty_table(), *(b for b in blocks if "id" in b.column_names)])


def map_samples(block: pa.Table, step: Callable[[list[Sample]], None]) -> pa.Table:
    """Run a step that updates samples in place over a block."""
    with gc_paused():
        samples = from_block(block)
        if not samples:
            return block
        step(samples)
        return to_block(samples, kept=block)
