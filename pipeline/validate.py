"""Row validation and expansion into (id, sample_index) work items.

A bad row never stops the job: it becomes one error record keyed
(id, -(occurrence+1)) so that its key is stable across runs and distinct from
the sample keys. Good rows expand into num_samples items, each with its own
seed; items already committed by an earlier run are dropped here (resume).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pyarrow as pa

from pipeline.families import get_family
from pipeline.family import RowError
from pipeline.keys import KeySet, pair_hashes
from pipeline.manifest import KNOWN_COLUMNS
from pipeline.plan import MAX_SAMPLES_PER_ROW, samples_of
from pipeline.rows import Row, fail, to_block

TASKS = ("t2i", "edit", "variation", "understand")
NEEDS_IMAGE = ("edit", "variation", "understand")
NEEDS_PROMPT = ("t2i", "edit", "understand")
MAX_SIDE = 8192


def sample_seed(seed: int, row_id: str, sample_index: int) -> int:
    """The only source of a sample's randomness: independent of batch, replica, retry."""
    digest = hashlib.blake2b(f"{seed}\x1f{row_id}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _int_field(value: Any, name: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and (math.isnan(value) or value != int(value)):
        raise RowError(f"bad_{name}", f"{name} must be an integer, got {value}")
    v = int(value)
    if not lo <= v <= hi:
        raise RowError(f"bad_{name}", f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _params(value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError("bad_params", f"params is not valid JSON: {e}") from None
    if isinstance(value, list) and all(isinstance(kv, tuple) for kv in value):  # Arrow map
        value = dict(value)
    if not isinstance(value, dict):
        raise RowError("bad_params", f"params must be a JSON object, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


class Expand:
    """Manifest rows -> validated work items (batch function over Arrow tables)."""

    def __init__(self, family: str, *, job_seed: int, sampler: dict[str, dict], max_prompt_chars: int,
                 duplicates: dict[int, int], committed: KeySet):
        self.family, self.job_seed, self.sampler = get_family(family), job_seed, sampler
        self.max_prompt_chars, self.duplicates, self.committed = max_prompt_chars, duplicates, committed

    def check(self, m: dict) -> dict:
        """Raises RowError for a bad row; returns its validated task, num_samples,
        seed (the row's or the job's), width, height and params."""
        if not m.get("id"):
            raise RowError("missing_id", "id is null or empty")
        if m["_ordinal"] in self.duplicates:
            raise RowError("duplicate_id", f"id {m['id']!r} appeared earlier in the manifest")
        task = m.get("task") or "t2i"
        if task not in TASKS:
            raise RowError("unknown_task", f"task {task!r} is not one of {', '.join(TASKS)}")
        if task not in self.family.tasks:
            raise RowError("unsupported_task", f"family {self.family.name} does not do {task!r} (it does {', '.join(sorted(self.family.tasks))})")
        prompt = m.get("prompt")
        if task in NEEDS_PROMPT and (prompt is None or not prompt.strip()):
            raise RowError("empty_prompt", "prompt is empty")
        if prompt is not None and len(prompt) > self.max_prompt_chars:
            raise RowError("prompt_too_long", f"prompt has {len(prompt)} characters (limit {self.max_prompt_chars})")
        seed = _int_field(m.get("seed"), "seed", 0, 2**63 - 1)
        width, height = (_int_field(m.get(side), side, 1, MAX_SIDE) for side in ("width", "height"))
        n = samples_of(m.get("num_samples"))
        if n is None:
            raise RowError("bad_num_samples", f"num_samples must be an integer in [1, {MAX_SAMPLES_PER_ROW}], got {m.get('num_samples')}")
        if task in NEEDS_IMAGE and m.get("image") in (None, b"", ""):
            raise RowError("missing_input", f"task {task!r} needs an image")
        params = self.family.params_for(task, {**self.sampler.get(task, {}), **_params(m.get("params"))})
        return {"task": task, "num_samples": n, "seed": self.job_seed if seed is None else seed,
                "width": width, "height": height, "params": params}

    def __call__(self, table: pa.Table) -> pa.Table:
        out: list[Row] = []
        for m in table.to_pylist():
            extras = {k: v for k, v in m.items() if k not in KNOWN_COLUMNS and k != "_ordinal"}
            base = {"id": m.get("id") or "", "task": m.get("task") or "t2i", "prompt": m.get("prompt"), "extras": extras}
            try:
                item = self.check(m)
            except RowError as e:
                key = -(self.duplicates.get(m["_ordinal"], 0) + 1)
                # the record stands for all the pairs the plan expected of this row
                covers = 1 if m["_ordinal"] in self.duplicates else (samples_of(m.get("num_samples")) or 1)
                if not self.committed.contains(pair_hashes([base["id"]], [key]))[0]:
                    out.append(fail({**base, "sample_index": key, "covers": covers}, "validate", e.kind, str(e)))
                continue
            n, seed = item.pop("num_samples"), item["seed"]
            todo = [i for i, done in enumerate(self.committed.contains(pair_hashes([m["id"]] * n, range(n)))) if not done]
            for i in todo:
                out.append({**base, **item, "sample_index": i, "sample_seed": sample_seed(seed, m["id"], i),
                            "negative_prompt": m.get("negative_prompt"), "image": m.get("image"), "mask": m.get("mask")})
        return to_block(out)
