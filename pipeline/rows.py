"""How samples travel between steps: one sample per block row, its fields as Arrow columns.

One sample per row, so that Ray forms every model batch exactly as it forms batches of
rows (batch composition can change a model's low bits, and the same manifest must give
the same bytes). The fields the runner owns are plain columns, built and read a column at a
time; only what has no fixed shape (the family's state, inputs, extras, pixels, embeddings,
scores) is pickled, per row, and only when the row has any: a freshly validated sample
carries none. A sample's params are pickled once per distinct object in a block and
restored once per distinct value (they are immutable, so samples may share one). Pickle is
safe here: these bytes are made by this job's own steps a moment earlier and are never
written to storage or read from a user.

Measured with a trivial stage (bench/bench_scale.py), moving samples as packs of pickled
`Sample` objects took about half of the machinery's time; see BENCHMARKS.md.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.gcpause import gc_paused
from pipeline.sample import Failure, Outputs, Sample

SCHEMA = pa.schema([
    ("id", pa.string()), ("sample_index", pa.int64()), ("task", pa.string()), ("prompt", pa.large_string()),
    ("negative_prompt", pa.large_string()), ("seed", pa.int64()), ("sample_seed", pa.int64()), ("width", pa.int32()),
    ("height", pa.int32()), ("covers", pa.int32()), ("ordinal", pa.int64()), ("content", pa.uint64()),
    ("params", pa.large_binary()),
    ("failure_stage", pa.string()), ("failure_kind", pa.string()), ("failure_message", pa.large_string()),
    ("failure_retryable", pa.bool_()),
    ("image", pa.large_binary()), ("image_width", pa.int32()), ("image_height", pa.int32()), ("text", pa.large_string()),
    ("stage_seconds", pa.map_(pa.string(), pa.float64())),
    ("has_pixels", pa.bool_()),  # lets a step that only handles pixels (encoding) pass a block without reading it
    ("rest", pa.large_binary()),  # pickled {field: value} of the fields below that are set, or null
])
PLAIN = ("id", "sample_index", "task", "prompt", "negative_prompt", "seed", "sample_seed", "width", "height", "covers",
         "ordinal", "content")
REST = ("inputs", "extras", "state", "pixels", "embeddings", "scores")  # empty ones are left out


def _rest(s: Sample) -> bytes | None:
    o = s.outputs
    values = (("inputs", s.inputs), ("extras", s.extras), ("state", s.state), ("pixels", o.pixels),
              ("embeddings", o.embeddings), ("scores", o.scores))
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


def to_block(samples: list[Sample]) -> pa.Table:
    failures = [s.failure for s in samples]
    sizes = [s.outputs.image_size for s in samples]
    columns: dict[str, Any] = {name: [getattr(s, name) for s in samples] for name in PLAIN}
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
        "has_pixels": [s.outputs.pixels is not None for s in samples],
        "rest": [_rest(s) for s in samples],
    })
    return pa.table([pa.array(columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA)


def has_pixels(block: pa.Table) -> bool:
    return "has_pixels" in block.column_names and bool(pc.any(block.column("has_pixels")).as_py())


def _column(block: pa.Table | dict, name: str) -> list:
    col = block[name] if isinstance(block, dict) else block.column(name)
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def from_block(block: pa.Table | dict) -> list[Sample]:
    names = block.keys() if isinstance(block, dict) else block.column_names
    if "id" not in names:  # Ray hands on empty blocks without columns
        return []
    c = {name: _column(block, name) for name in SCHEMA.names}
    params: dict[bytes, Any] = {}
    samples = []
    failures = zip(c["failure_stage"], c["failure_kind"], c["failure_message"], c["failure_retryable"])
    images = zip(c["image"], c["image_width"], c["image_height"], c["text"])
    for plain, blob, (stage, kind, message, retryable), (image, width, height, text), seconds, packed in zip(
            zip(*(c[name] for name in PLAIN)), c["params"], failures, images, c["stage_seconds"], c["rest"]):
        if blob is not None and blob not in params:
            params[blob] = pickle.loads(blob)
        rest = pickle.loads(packed) if packed is not None else {}
        s = Sample(*plain[:3], **dict(zip(PLAIN[3:], plain[3:])))
        s.params = None if blob is None else params[blob]
        s.inputs, s.extras, s.state = rest.get("inputs", {}), rest.get("extras", {}), rest.get("state")
        s.failure = None if kind is None else Failure(stage, kind, message, retryable)
        s.outputs = Outputs(pixels=rest.get("pixels"), image=image, text=text, image_size=None if width is None else (width, height),
                            embeddings=rest.get("embeddings", {}), scores=rest.get("scores", {}))
        s.stage_seconds = dict(seconds)
        samples.append(s)
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
        return to_block(samples)
