"""Row validation: bad rows become error records, good rows expand to samples."""

import json

import numpy as np
import pyarrow as pa

from pipeline.keys import KeySet, pair_hashes
from pipeline.rows import from_block
from pipeline.validate import Expand, sample_seed
from tests.conftest import TOY


def expand(rows, committed=KeySet(np.zeros(0, np.uint64)), duplicates=None, **kw):
    table = pa.Table.from_pylist([{**r, "_ordinal": i} for i, r in enumerate(rows)])
    fn = Expand(TOY, job_seed=kw.get("seed", 7), sampler=kw.get("sampler", {}), max_prompt_chars=kw.get("max_chars", 50),
                duplicates=duplicates or {}, committed=committed)
    return from_block(fn(table))


def test_each_kind_of_bad_row_is_recorded_and_good_rows_expand():
    rows = [
        {"id": "ok", "prompt": "a cat", "num_samples": 3, "task": None, "seed": None, "params": None, "image": None, "width": None},
        {"id": "empty", "prompt": "  ", "num_samples": 1, "task": "t2i", "seed": None, "params": None, "image": None, "width": None},
        {"id": "long", "prompt": "x" * 51, "num_samples": 1, "task": "t2i", "seed": None, "params": None, "image": None, "width": None},
        {"id": "negseed", "prompt": "a", "num_samples": 1, "task": "t2i", "seed": -1, "params": None, "image": None, "width": None},
        {"id": "task", "prompt": "a", "num_samples": 1, "task": "paint", "seed": None, "params": None, "image": None, "width": None},
        {"id": "unsup", "prompt": "a", "num_samples": 1, "task": "understand", "seed": None, "params": None, "image": b"x", "width": None},
        {"id": "noimg", "prompt": "a", "num_samples": 1, "task": "edit", "seed": None, "params": None, "image": None, "width": None},
        {"id": "json", "prompt": "a", "num_samples": 1, "task": "t2i", "seed": None, "params": "{oops", "image": None, "width": None},
        {"id": "key", "prompt": "a", "num_samples": 1, "task": "t2i", "seed": None, "params": '{"steps": 3}', "image": None, "width": None},
        {"id": "n", "prompt": "a", "num_samples": 0, "task": "t2i", "seed": None, "params": None, "image": None, "width": None},
        {"id": "w", "prompt": "a", "num_samples": 1, "task": "t2i", "seed": None, "params": None, "image": None, "width": -4},
        {"id": None, "prompt": "a", "num_samples": 1, "task": "t2i", "seed": None, "params": None, "image": None, "width": None},
    ]
    out = expand(rows)
    kinds = {r["id"]: r["error"]["kind"] for r in out if "error" in r}
    assert kinds == {"empty": "empty_prompt", "long": "prompt_too_long", "negseed": "bad_seed", "task": "unknown_task",
                     "unsup": "unsupported_task", "noimg": "missing_input", "json": "bad_params", "key": "bad_params",
                     "n": "bad_num_samples", "w": "bad_width", "": "missing_id"}
    good = [r for r in out if "error" not in r]
    assert [(r["id"], r["sample_index"]) for r in good] == [("ok", 0), ("ok", 1), ("ok", 2)]
    assert [r["sample_seed"] for r in good] == [sample_seed(7, "ok", i) for i in range(3)]
    assert len({r["sample_seed"] for r in good}) == 3
    assert all(r["sample_index"] == -1 for r in out if "error" in r)


def test_params_merge_job_sampler_then_row_and_row_seed_wins():
    out = expand([{"id": "a", "prompt": "p", "seed": 11, "params": json.dumps({"gain": 2})}], sampler={"t2i": {"size": 8, "gain": 3}})
    assert out[0]["params"] == {"size": 8, "gain": 2.0}
    assert out[0]["seed"] == 11 and out[0]["sample_seed"] == sample_seed(11, "a", 0)


def test_non_integer_float_seed_is_a_row_error():
    out = expand([{"id": "a", "prompt": "p", "seed": 1.5}, {"id": "b", "prompt": "p", "seed": 2.0}])
    assert out[0]["error"]["kind"] == "bad_seed"
    assert out[1]["seed"] == 2


def test_committed_pairs_and_error_records_are_skipped():
    committed = KeySet(pair_hashes(["a", "a", "bad"], [0, 2, -1]))
    out = expand([{"id": "a", "prompt": "p", "num_samples": 3}, {"id": "bad", "prompt": ""}], committed=committed)
    assert [(r["id"], r["sample_index"]) for r in out] == [("a", 1)]


def test_duplicate_occurrences_get_distinct_stable_keys():
    out = expand([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "p"}, {"id": "a", "prompt": "p"}], duplicates={1: 1, 2: 2})
    assert [(r["sample_index"], r.get("error", {}).get("kind")) for r in out] == [(0, None), (-2, "duplicate_id"), (-3, "duplicate_id")]
