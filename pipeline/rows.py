"""Rows in flight between stages.

Between the validate step and the sink a row is a Python dict holding whatever
the family's stages need (tensors, PIL images, numpy arrays). Blocks carry it as
one pickled column beside plain `id` / `sample_index` columns. Pickle is safe
here: these bytes are made by this job's own stages a moment earlier and are
never written to storage or read from a user.
"""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa

Row = dict[str, Any]


def to_block(rows: list[Row]) -> pa.Table:
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "sample_index": pa.array([r["sample_index"] for r in rows], pa.int64()),
            "row": pa.array([pickle.dumps(r, protocol=5) for r in rows], pa.large_binary()),
        }
    )


def from_block(block: pa.Table | dict) -> list[Row]:
    names = block.keys() if isinstance(block, dict) else block.column_names
    if "row" not in names:  # Ray hands on empty blocks without columns
        return []
    col = block["row"] if isinstance(block, dict) else block.column("row")
    values = col.to_pylist() if hasattr(col, "to_pylist") else list(col)
    return [pickle.loads(v) for v in values]


def fail(row: Row, stage: str, kind: str, message: str) -> Row:
    """Mark `row` failed; later stages pass it through untouched."""
    row["error"] = {"stage": stage, "kind": kind, "message": message[:2000]}
    return row
