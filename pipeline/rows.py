"""How samples travel between steps: one pickled `Sample` per row of a block.

Blocks carry it beside plain `id` / `sample_index` columns. Pickle is safe here: these
bytes are made by this job's own steps a moment earlier and are never written to
storage or read from a user.
"""

from __future__ import annotations

import pickle

import pyarrow as pa

from pipeline.sample import Sample


def to_block(samples: list[Sample]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([s.id for s in samples], pa.string()),
            "sample_index": pa.array([s.sample_index for s in samples], pa.int64()),
            "sample": pa.array([pickle.dumps(s, protocol=5) for s in samples], pa.large_binary()),
        }
    )


def from_block(block: pa.Table | dict) -> list[Sample]:
    names = block.keys() if isinstance(block, dict) else block.column_names
    if "sample" not in names:  # Ray hands on empty blocks without columns
        return []
    col = block["sample"] if isinstance(block, dict) else block.column("sample")
    values = col.to_pylist() if hasattr(col, "to_pylist") else list(col)
    return [pickle.loads(v) for v in values]
