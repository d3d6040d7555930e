"""Row validation: bad rows become error records, good rows expand to samples."""

import json

import numpy as np
import pyarrow as pa

from pipeline.keys import KeySet, pair_hashes
from pipeline.manifest import ORDINAL
from pipeline.rows import from_block
from pipeline.validate import Expand, sample_seed
from tests.conftest import TOY

NOTHING = KeySet(np.zeros(0, np.uint64))


def expand(rows, committed=NOTHING, duplicates=None, extras=None, schema=None, **kw):
    table = pa.Table.from_pylist([{**r, ORDINAL: i} for i, r in enumerate(rows)], schema=schema)
    fn = Expand(TOY, job_seed=kw.get("seed", 7), sampler=kw.get("sampler", {}), max_prompt_chars=kw.get("max_chars", 50),
                duplicates=duplicates or {}, committed=committed, extras=extras or {})
    return from_block(fn(table))


def test_each_kind_of_bad_row_is_recorded_and_good_rows_expand():
    base = {"prompt": "a", "num_samples": 1, "task": "t2i", "seed": None, "params": None, "image": None, "width": None}
    rows = [
        {**base, "id": "ok", "prompt": "a cat", "num_samples": 3, "task": None},
        {**base, "id": "empty", "prompt": "  "},
        {**base, "id": "long", "prompt": "x" * 51},
        {**base, "id": "negseed", "seed": -1},
        {**base, "id": "task", "task": "paint"},
        {**base, "id": "unsup", "task": "understand", "image": b"x"},
        {**base, "id": "noimg", "task": "edit"},
        {**base, "id": "json", "params": "{oops"},
        {**base, "id": "key", "params": '{"steps": 3}'},
        {**base, "id": "val", "params": '{"size": -3}'},
        {**base, "id": "n", "num_samples": 0},
        {**base, "id": "w", "width": -4},
        {**base, "id": None},
    ]
    out = expand(rows)
    kinds = {r.id: r.failure.kind for r in out if r.failure}
    assert kinds == {"empty": "empty_prompt", "long": "prompt_too_long", "negseed": "bad_seed", "task": "unsupported_task",
                     "unsup": "unsupported_task", "noimg": "missing_input", "json": "bad_params", "key": "bad_params",
                     "val": "bad_params", "n": "bad_num_samples", "w": "bad_width", "": "missing_id"}
    messages = {r.id: r.failure.message for r in out if r.failure}
    assert messages["key"].startswith("params.steps:") and messages["val"].startswith("params.size:")  # the field is named
    good = [r for r in out if not r.failure]
    assert [r.key for r in good] == [("ok", 0), ("ok", 1), ("ok", 2)]
    assert [r.sample_seed for r in good] == [sample_seed(7, "ok", i) for i in range(3)]
    assert len({r.sample_seed for r in good}) == 3
    assert all(r.sample_index == -1 for r in out if r.failure)


def test_params_merge_job_sampler_then_row_and_row_seed_wins():
    out = expand([{"id": "a", "prompt": "p", "seed": 11, "params": json.dumps({"gain": 2})}], sampler={"t2i": {"size": 8, "gain": 3}})
    assert out[0].params.model_dump() == {"size": 8, "gain": 2.0}
    assert out[0].seed == 11 and out[0].sample_seed == sample_seed(11, "a", 0)


def test_non_integer_float_seed_is_a_row_error():
    out = expand([{"id": "a", "prompt": "p", "seed": 1.5}, {"id": "b", "prompt": "p", "seed": 2.0}])
    assert out[0].failure.kind == "bad_seed"
    assert out[1].seed == 2


def test_committed_pairs_and_error_records_are_skipped():
    committed = KeySet(pair_hashes(["a", "a", "bad"], [0, 2, -1]))
    out = expand([{"id": "a", "prompt": "p", "num_samples": 3}, {"id": "bad", "prompt": ""}], committed=committed)
    assert [r.key for r in out] == [("a", 1)]


def test_duplicate_occurrences_get_distinct_stable_keys():
    out = expand([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "p"}, {"id": "a", "prompt": "p"}], duplicates={1: 1, 2: 2})
    assert [(r.sample_index, r.failure and r.failure.kind) for r in out] == [(0, None), (-2, "duplicate_id"), (-3, "duplicate_id")]


def test_infinite_and_huge_values_are_row_errors():
    rows = [{"id": "s", "prompt": "p", "seed": float("inf"), "width": None, "num_samples": 1.0},
            {"id": "w", "prompt": "p", "seed": None, "width": float("-inf"), "num_samples": 1.0},
            {"id": "n", "prompt": "p", "seed": None, "width": None, "num_samples": float("inf")},
            {"id": "nan", "prompt": "p", "seed": float("nan"), "width": None, "num_samples": 1.0},
            {"id": "ok", "prompt": "p", "seed": 3.0, "width": 8.0, "num_samples": 2.0}]
    out = expand(rows)
    assert {r.id: r.failure.kind for r in out if r.failure} == {"s": "bad_seed", "w": "bad_width", "n": "bad_num_samples", "nan": "bad_seed"}
    assert [(r.key, r.width) for r in out if not r.failure] == [(("ok", 0), 8), (("ok", 1), 8)]


def test_deeply_nested_params_are_a_row_error():
    deep = "[" * 100_000 + "]" * 100_000
    out = expand([{"id": "deep", "prompt": "p", "params": '{"gain": ' + deep + "}"}, {"id": "ok", "prompt": "p", "params": None}])
    assert out[0].failure.kind == "bad_params" and not out[1].failure


def test_invalid_utf8_in_a_text_column_fails_that_row_only():
    prompts = pa.array([b"fine", b"bad \xff\xfe", b"also fine"], pa.binary()).view(pa.string())
    table_rows = [{"id": i, "prompt": None} for i in ("a", "b", "c")]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())])
    table = pa.Table.from_pylist([{**r, ORDINAL: k} for k, r in enumerate(table_rows)],
                                 schema=schema.append(pa.field(ORDINAL, pa.int64())))
    table = table.set_column(1, "prompt", prompts)
    fn = Expand(TOY, job_seed=0, sampler={}, max_prompt_chars=50, duplicates={}, committed=NOTHING, extras={})
    out = from_block(fn(table))
    assert [(r.id, r.failure and r.failure.kind) for r in out] == [("a", None), ("b", "bad_text"), ("c", None)]
    assert out[2].prompt == "also fine"


def test_extras_are_carried_under_their_output_names():
    out = expand([{"id": "a", "prompt": "p", "model": "forged", "shot": 3}], extras={"model": "extra_model", "shot": "shot"})
    assert out[0].extras == {"extra_model": "forged", "shot": 3}


def _nasty_rows() -> list[dict]:
    """Rows of every shape validation meets, valid and not, for the bulk and the row-by-row paths."""
    rows = [
        {"id": "plain", "prompt": "a cat"},
        {"id": "cjk", "prompt": "猫"},  # no visible ASCII: left to `check`, valid all the same
        {"id": "ideographic-space", "prompt": "\u3000"},  # Python's strip() removes it: empty
        {"id": "unit-separator", "prompt": "\x1c\x1f"},  # whitespace to str.strip() only
        {"id": "blank", "prompt": " \t\n"},
        {"id": "", "prompt": "no id"},
        {"id": None, "prompt": "null id"},
        {"id": "dup", "prompt": "first"},
        {"id": "dup", "prompt": "second"},
        {"id": "many", "prompt": "three", "num_samples": 3, "seed": 5, "width": 32, "height": 16, "negative_prompt": "blur"},
        {"id": "too-many", "prompt": "x", "num_samples": 65},
        {"id": "no-samples", "prompt": "x", "num_samples": 0},
        {"id": "big-seed", "prompt": "x", "seed": 2**63 - 1},
        {"id": "neg-seed", "prompt": "x", "seed": -1},
        {"id": "wide", "prompt": "x", "width": 8193},
        {"id": "zero-height", "prompt": "x", "height": 0},
        {"id": "long", "prompt": "y" * 51},
        {"id": "long-cjk", "prompt": "猫" * 50},  # 50 characters, 150 bytes: allowed
        {"id": "params", "prompt": "x", "params": '{"gain": 2}'},
        {"id": "params-again", "prompt": "x", "params": '{"gain": 2}'},
        {"id": "params-empty", "prompt": "x", "params": ""},
        {"id": "params-bad-json", "prompt": "x", "params": "{oops"},
        {"id": "params-bad-value", "prompt": "x", "params": '{"size": -3}'},
        {"id": "params-list", "prompt": "x", "params": "[1]"},
        {"id": "task-empty", "prompt": "x", "task": ""},
        {"id": "task-unknown", "prompt": "x", "task": "paint"},
        {"id": "edit", "prompt": "x", "task": "edit", "image": b"\x89PNG"},
        {"id": "edit-no-image", "prompt": "x", "task": "edit"},
        {"id": "partly-done", "prompt": "x", "num_samples": 3},
        {"id": "all-done", "prompt": "x", "num_samples": 2},
        {"id": "error-done", "prompt": " "},
    ]
    return [{"task": None, "seed": None, "width": None, "height": None, "num_samples": None, "params": None, "image": None,
             "negative_prompt": None, "tag": f"t{i}", **r} for i, r in enumerate(rows)]


def test_rows_validated_in_bulk_become_exactly_what_row_by_row_validation_makes():
    rows = _nasty_rows()
    table = pa.Table.from_pylist([{**r, ORDINAL: 100 + i} for i, r in enumerate(rows)])
    dup = next(i for i, r in enumerate(rows) if r["prompt"] == "second")
    done = [("partly-done", 1), ("all-done", 0), ("all-done", 1), ("error-done", -1)]
    committed = KeySet(pair_hashes(pa.array([k for k, _ in done]), pa.array([i for _, i in done])))

    def make(bulk: bool, end_ordinal=None) -> pa.Table:
        fn = Expand(TOY, job_seed=7, sampler={"t2i": {"size": 8}}, max_prompt_chars=50, duplicates={100 + dup: 1},
                    committed=committed, extras={"tag": "extra_tag"}, end_ordinal=end_ordinal)
        if not bulk:  # the reference: every row through `check`
            fn.passing = lambda t: np.zeros(t.num_rows, bool)
        return fn(table)

    for end in (None, 100 + 12):
        fast, slow = make(True, end), make(False, end)
        assert fast.equals(slow), end
    out = from_block(make(True))
    made = {s.key for s in out if s.failure is None}
    assert ("plain", 0) in made and ("cjk", 0) in made and ("long-cjk", 0) in made and ("edit", 0) in made
    assert ("partly-done", 0) in made and ("partly-done", 2) in made and ("partly-done", 1) not in made
    assert not any(s.id in ("all-done", "error-done") for s in out)
    kinds = {s.id: s.failure.kind for s in out if s.failure is not None}
    assert kinds["ideographic-space"] == kinds["unit-separator"] == kinds["blank"] == "empty_prompt"
    assert kinds["dup"] == "duplicate_id" and kinds["params-list"] == "bad_params" and kinds["edit-no-image"] == "missing_input"
    assert [s.extras for s in out if s.id == "many"] == [{"extra_tag": "t9"}] * 3
    # the bulk path did take most rows: only those it cannot decide went row by row
    fn = Expand(TOY, job_seed=7, sampler={}, max_prompt_chars=50, duplicates={100 + dup: 1}, committed=committed, extras={})
    passing = fn.passing(table)
    assert passing[[0, 9, 12, 18, 24]].all() and not passing[[1, 2, 3, 5, 6, 8, 26]].any()


def test_a_seed_or_count_of_another_type_is_validated_row_by_row_alike():
    rows = [{"id": "f", "prompt": "x", "seed": 3.0, "num_samples": 2.0}, {"id": "g", "prompt": "x", "seed": 2.5, "num_samples": 1.0},
            {"id": "h", "prompt": "x", "seed": None, "num_samples": None}]
    table = pa.Table.from_pylist([{**r, ORDINAL: i} for i, r in enumerate(rows)])
    fast = Expand(TOY, job_seed=7, sampler={}, max_prompt_chars=50, duplicates={}, committed=NOTHING, extras={})
    slow = Expand(TOY, job_seed=7, sampler={}, max_prompt_chars=50, duplicates={}, committed=NOTHING, extras={})
    slow.passing = lambda t: np.zeros(t.num_rows, bool)
    assert fast(table).equals(slow(table))
    assert [(s.key, s.failure and s.failure.kind) for s in from_block(fast(table))] == [
        (("f", 0), None), (("f", 1), None), (("g", -1), "bad_seed"), (("h", 0), None)]
