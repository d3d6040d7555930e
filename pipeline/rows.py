"""How samples travel between steps: packs of pickled `Sample`s, one pack per block row.

One pickle per pack, not per sample: within a pickle the classes and shared objects are
written once, which makes a pack of 16 several times cheaper per sample to move than 16
single pickles. Up to the last model stage a pack is one sample, so that Ray forms every
model batch exactly as it forms batches of rows (batch composition can change a model's
low bits, and the same manifest must give the same bytes). The last stage packs its output
for the steps after the models (encoding, the sink), which keep each block's packing. Pickle is safe
here: these bytes are made by this job's own steps a moment earlier and are never written
to storage or read from a user.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sample import Sample

MAX_PACK = 64


def to_block(samples: list[Sample], pack: int = 1, sizes: list[int] | None = None) -> pa.Table:
    """Samples as block rows of `pack` samples (or of the given `sizes`)."""
    if sizes is None:
        sizes = [min(pack, len(samples) - i) for i in range(0, len(samples), pack)]
    packs, at = [], 0
    for n in sizes:
        packs.append(samples[at: at + n])
        at += n
    return pa.table({
        "samples": pa.array([pickle.dumps(p, protocol=5) for p in packs], pa.large_binary()),
        "n": pa.array(sizes, pa.int32()),
        # lets a step that only handles pixels (encoding) pass a block without unpickling it
        "has_pixels": pa.array([any(s.outputs.pixels is not None for s in p) for p in packs], pa.bool_()),
    })


def has_pixels(block: pa.Table) -> bool:
    return "has_pixels" in block.column_names and bool(pc.any(block.column("has_pixels")).as_py())


def _column(block: pa.Table | dict, name: str) -> list:
    col = block[name] if isinstance(block, dict) else block.column(name)
    return col.to_pylist() if hasattr(col, "to_pylist") else list(col)


def from_block(block: pa.Table | dict) -> list[Sample]:
    names = block.keys() if isinstance(block, dict) else block.column_names
    if "samples" not in names:  # Ray hands on empty blocks without columns
        return []
    return [s for blob in _column(block, "samples") for s in pickle.loads(blob)]


def map_samples(block: pa.Table, step: Callable[[list[Sample]], None], pack: int = 0) -> pa.Table:
    """Run a step that updates samples in place; its output keeps the block's packing, or
    is packed `pack` samples a row."""
    samples = from_block(block)
    if not samples:
        return block
    step(samples)
    return to_block(samples, pack) if pack else to_block(samples, sizes=_column(block, "n"))
