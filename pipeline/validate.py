"""Row validation and expansion into samples, the (id, sample_index) work items.

A bad row never stops the job: it becomes one failed sample keyed
(id, -(occurrence+1)) so that its key is stable across runs and distinct from the
sample keys. Good rows expand into num_samples samples, each with its own seed;
samples already committed by an earlier run are dropped here (resume).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import uuid
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.families import get_family
from pipeline.family import parse_params
from pipeline.gcpause import gc_paused
from pipeline.keys import KeySet, content_hashes, pair_hashes
from pipeline.manifest import ORDINAL, Manifest, ManifestError, read_file_rows
from pipeline.plan import MAX_SAMPLES_PER_ROW, sample_counts, samples_of
from pipeline.rows import fresh_block, to_block
from pipeline.sample import RowError, Sample
from pipeline.storage import redact

if TYPE_CHECKING:
    from pipeline.spec import JobSpec

MAX_SIDE = 8192
MAX_SEED = 2**63 - 1
MAX_PARSED_PARAMS = 10_000  # distinct params texts kept parsed per worker


def sample_seed(seed: int, row_id: str, sample_index: int) -> int:
    """The only source of a sample's randomness: independent of batch, replica, retry."""
    digest = hashlib.blake2b(f"{seed}\x1f{row_id}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _int_field(value: Any, name: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
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
        except (json.JSONDecodeError, RecursionError) as e:
            raise RowError("bad_params", f"params is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(value, list) and all(isinstance(kv, tuple) for kv in value):  # Arrow map
        value = dict(value)
    if not isinstance(value, dict):
        raise RowError("bad_params", f"params must be a JSON object, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


def manifest_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows as dicts. A string column with invalid UTF-8 in some rows is read as
    bytes; those rows carry the column's name in "__bad_utf8" (a row error later)."""
    bad: list[list[str]] = [[] for _ in range(table.num_rows)]
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                raw = col.cast(pa.large_binary()).to_pylist()
                values = []
                for i, b in enumerate(raw):
                    try:
                        values.append(None if b is None else b.decode("utf-8"))
                    except UnicodeDecodeError:
                        bad[i].append(name)
                        values.append(None)
                columns[name] = values
                continue
        columns[name] = col.to_pylist()
    rows = [dict(zip(columns, vals)) for vals in zip(*columns.values())]
    for row, cols in zip(rows, bad):
        if cols:
            row["__bad_utf8"] = cols
    return rows


@dataclass(frozen=True)
class ExpandConfig:
    """What validation needs, shipped to every read task (Ray puts it in the object store once)."""

    family: str
    job_seed: int
    sampler: dict[str, dict]
    max_prompt_chars: int
    duplicates: dict[int, int]
    committed: KeySet
    extras: dict[str, str]
    end_ordinal: int | None = None  # --limit: rows from this ordinal on wait for a later run
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # one job's config: its Expand is built once per worker


def pair_keys(table: pa.Table, duplicates: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's candidate pair keys, in bulk (one hash for the whole table). Row r's are
    keys[first[r]: first[r] + counts[r]]: its samples 0..n-1, then its error record's key.
    `table`: id, ORDINAL and (optionally) num_samples."""
    ids = pc.fill_null(table.column("id"), "") if "id" in table.column_names else pa.array([""] * table.num_rows)
    n = sample_counts(table.column("num_samples")) if "num_samples" in table.column_names else np.ones(table.num_rows, np.int8)
    ordinals = table.column(ORDINAL).to_numpy()
    error_index = -np.array([duplicates.get(int(o), 0) + 1 for o in ordinals], np.int64)
    counts = n.astype(np.int64) + 1
    row_of = np.repeat(np.arange(table.num_rows), counts)
    first = np.cumsum(counts) - counts
    index = np.arange(len(row_of)) - first[row_of]
    index[first + counts - 1] = error_index
    return pair_hashes(pc.take(ids, pa.array(row_of)), pa.array(index)), first, counts


def committed_pairs(table: pa.Table, duplicates: dict[int, int], committed: KeySet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which of each row's pairs (pair_keys) are committed: done[first[r]: first[r] + counts[r]]."""
    keys, first, counts = pair_keys(table, duplicates)
    return committed.contains(keys), first, counts


def pending_rows(table: pa.Table, duplicates: dict[int, int], committed: KeySet) -> np.ndarray:
    """Per row: does a run still have work in it (a sample to make, or an error to record)?
    As Expand decides it, without validating: a row whose error record is committed has none."""
    done, first, counts = committed_pairs(table, duplicates, committed)
    last = first + counts - 1
    missing = (~done).astype(np.int64)
    todo = np.add.reduceat(missing, first) - missing[last] if len(done) else np.zeros(0, np.int64)
    dup = np.isin(table.column(ORDINAL).to_numpy(), np.fromiter(duplicates, np.int64, len(duplicates)))
    return ~done[last] & ((todo > 0) | dup)


def end_of_first_pending(manifest: Manifest, skip: dict[str, frozenset[int]], duplicates: dict[int, int], committed: KeySet,
                         limit: int) -> int | None:
    """--limit: the ordinal just past the first `limit` rows with work left, in manifest
    order (None: fewer rows than that have any). Reads the id columns of row groups with
    work left, and stops as soon as it has seen enough."""
    seen = 0
    for f in manifest.files:
        for table in read_file_rows(manifest.url_of(f), f, manifest.key_columns, skip_groups=skip.get(f.identity, frozenset()), mapping=manifest.columns):
            pending = np.flatnonzero(pending_rows(table, duplicates, committed))
            if seen + len(pending) >= limit:
                return int(table.column(ORDINAL)[int(pending[limit - seen - 1])].as_py()) + 1
            seen += len(pending)
    return None


_EXPANDERS: dict[str, Expand] = {}


def expand_block(table: pa.Table, *, config: ExpandConfig) -> pa.Table:
    """Validate one table of manifest rows, in the read task that read it (jobs/ray_io.py);
    the Expand is built once per worker and job."""
    expand = _EXPANDERS.get(config.token)
    if expand is None:
        _EXPANDERS.clear()  # a worker serves one job at a time: drop the last one's key set
        settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "token"}  # Expand's arguments
        expand = _EXPANDERS[config.token] = Expand(**settings)
    with gc_paused():
        return expand(table)


class Expand:
    """Manifest rows -> validated samples (batch function over Arrow tables)."""

    def __init__(self, family: str, *, job_seed: int, sampler: dict[str, dict], max_prompt_chars: int,
                 duplicates: dict[int, int], committed: KeySet, extras: dict[str, str], end_ordinal: int | None = None):
        self.family, self.job_seed, self.sampler = get_family(family), job_seed, sampler
        self.max_prompt_chars, self.duplicates, self.committed = max_prompt_chars, duplicates, committed
        self.extras = extras  # manifest column -> output column name
        self.end_ordinal = end_ordinal
        self._parsed: dict[tuple[str, str | None], Any] = {}
        self.input_columns = sorted({inp.name for spec in self.family.tasks.values() for inp in spec.inputs})

    def check(self, m: dict) -> dict:
        """Raises RowError for a bad row; returns the fields of its samples and num_samples."""
        if m.get("__bad_utf8"):
            raise RowError("bad_text", f"column(s) {', '.join(m['__bad_utf8'])} not valid UTF-8")
        if not m.get("id"):
            raise RowError("missing_id", "id is null or empty")
        if m[ORDINAL] in self.duplicates:
            raise RowError("duplicate_id", f"id {m['id']!r} appeared earlier in the manifest")
        task = m.get("task") or "t2i"
        spec = self.family.tasks.get(task)
        if spec is None:
            raise RowError("unsupported_task", f"family {self.family.name} does not do {task!r} (it does {', '.join(sorted(self.family.tasks))})")
        prompt = m.get("prompt")
        if spec.needs_prompt and (prompt is None or not prompt.strip()):
            raise RowError("empty_prompt", "prompt is empty")
        if prompt is not None and len(prompt) > self.max_prompt_chars:
            raise RowError("prompt_too_long", f"prompt has {len(prompt)} characters (limit {self.max_prompt_chars})")
        seed = _int_field(m.get("seed"), "seed", 0, MAX_SEED)
        width, height = (_int_field(m.get(side), side, 1, MAX_SIDE) for side in ("width", "height"))
        n = samples_of(m.get("num_samples"))
        if n is None:
            raise RowError("bad_num_samples", f"num_samples must be an integer in [1, {MAX_SAMPLES_PER_ROW}], got {m.get('num_samples')}")
        inputs: dict[str, Any] = {}
        for inp in spec.inputs:
            value = m.get(inp.name)
            empty = value in (None, b"", "") or (inp.many and not value)
            if empty and inp.required:
                raise RowError("missing_input", f"task {task!r} needs {inp.name!r}")
            if not empty:
                inputs[inp.name] = list(value or []) if inp.many else value
        params = self._params(task, spec, m.get("params"))
        return {"task": task, "prompt": prompt, "negative_prompt": m.get("negative_prompt"), "width": width, "height": height,
                "seed": self.job_seed if seed is None else seed, "params": params, "inputs": inputs, "num_samples": n}

    def _params(self, task: str, spec, raw: Any):
        """The row's sampler params; rows with the same params text share one (immutable) instance."""
        key = (task, raw) if raw is None or isinstance(raw, str) else None
        if key is not None and key in self._parsed:
            return self._parsed[key]
        try:
            params = parse_params(spec.params, {**self.sampler.get(task, {}), **_params(raw)})
        except RecursionError:
            raise RowError("bad_params", "params are nested too deeply") from None
        if key is not None:
            if len(self._parsed) >= MAX_PARSED_PARAMS:
                self._parsed.clear()
            self._parsed[key] = params
        return params

    @staticmethod
    def pending(done: np.ndarray, first: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> list[tuple[list[int], bool]]:
        """For each of `rows`: the sample indices not committed yet, and whether its error record
        is committed (`done`, `first`, `counts`: committed_pairs of the table)."""
        if not len(rows):
            return []
        last = first + counts - 1
        any_done = np.add.reduceat(done.astype(np.int64), first) - done[last]  # samples committed, per row
        out = []
        for r in rows.tolist():
            lo, hi = int(first[r]), int(last[r])
            todo = list(range(hi - lo)) if not any_done[r] else np.flatnonzero(~done[lo:hi]).tolist()
            out.append((todo, bool(done[hi])))
        return out

    def passing(self, table: pa.Table) -> np.ndarray:
        """Per row: does it surely pass `check`, decided in bulk (Arrow compute over columns)?
        Conservative: a row it cannot decide so (a task with input images, a number or
        params of another type than the usual, a prompt without a visible ASCII character,
        text with invalid UTF-8 anywhere) is left to `check`, which also words every error."""
        n, names = table.num_rows, set(table.column_names)
        none = np.zeros(n, bool)

        def col(name: str):
            return table.column(name) if name in names else None

        def valid(name: str) -> np.ndarray:
            return pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)

        def true(mask) -> np.ndarray:
            return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)

        def is_text(name: str) -> bool:
            t = table.schema.field(name).type
            return pa.types.is_string(t) or pa.types.is_large_string(t)

        if not all(is_text(c) for c in ("id", "task", "prompt", "negative_prompt", "params") if c in names):
            return none
        try:  # (manifest_rows reads a column with invalid UTF-8 as bytes, and `check` names it)
            for c in table.column_names:
                if is_text(c):
                    table.column(c).validate(full=True)
        except pa.ArrowInvalid:
            return none
        if "id" not in names:
            return none
        ok = true(pc.greater(pc.binary_length(table.column("id")), 0))
        if self.duplicates:
            ok &= ~np.isin(table.column(ORDINAL).to_numpy(), np.fromiter(self.duplicates, np.int64, len(self.duplicates)))
        tasks = self.tasks(table)
        prompt = col("prompt")
        visible = true(pc.match_substring_regex(prompt, "[!-~]")) if prompt is not None else none
        for task in set(tasks.to_pylist()) if n else ():
            spec = self.family.tasks.get(task)
            rows = true(pc.equal(tasks, task))
            if spec is None or spec.inputs:
                ok &= ~rows
            elif spec.needs_prompt:
                ok &= ~rows | visible
        if prompt is not None:
            ok &= ~valid("prompt") | true(pc.less_equal(pc.utf8_length(prompt), self.max_prompt_chars))
        for name, lo, hi in (("seed", 0, MAX_SEED), ("width", 1, MAX_SIDE), ("height", 1, MAX_SIDE),
                             ("num_samples", 1, MAX_SAMPLES_PER_ROW)):
            values = col(name)
            if values is None:
                continue
            if not pa.types.is_integer(values.type):
                ok &= ~valid(name)
                continue
            ok &= ~valid(name) | true(pc.and_(pc.greater_equal(values, lo), pc.less_equal(values, hi)))
        return ok

    @staticmethod
    def tasks(table: pa.Table) -> pa.Array:
        """Each row's task (null or empty: t2i)."""
        if "task" not in table.column_names:
            return pa.array(["t2i"] * table.num_rows, pa.string())
        task = pc.fill_null(table.column("task").combine_chunks(), "")
        return pc.if_else(pc.equal(task, ""), "t2i", task).cast(pa.string())

    def params_in_bulk(self, table: pa.Table, tasks: pa.Array, rows: np.ndarray) -> list[bytes | None]:
        """The pickled params of each row in `rows`, parsed once per distinct (task, text); a
        row whose params do not parse leaves `rows` (`check` words its error)."""
        raw = table.column("params").to_pylist() if "params" in table.column_names else [None] * table.num_rows
        task = tasks.to_pylist()
        blobs: dict[tuple[str, str | None], bytes | None] = {}
        out: list[bytes | None] = [None] * table.num_rows
        for r in np.flatnonzero(rows).tolist():
            key = (task[r], raw[r])
            if key not in blobs:
                try:
                    blobs[key] = pickle.dumps(self._params(task[r], self.family.tasks[task[r]], raw[r]), protocol=5)
                except RowError:
                    blobs[key] = None
            if blobs[key] is None:
                rows[r] = False
            out[r] = blobs[key]
        return out

    def samples_in_bulk(self, table: pa.Table, rows: np.ndarray, done: np.ndarray, first: np.ndarray, counts: np.ndarray,
                        contents: np.ndarray) -> tuple[pa.Table, np.ndarray]:
        """The samples still to make of rows that pass (`passing`, then their params), as one
        block, and the row each comes from: what `check` and `_expand_row` would make of them,
        column by column. Rows whose params do not parse leave `rows`."""
        tasks = self.tasks(table)
        per_row = self.params_in_bulk(table, tasks, rows)
        entry_row = np.repeat(np.arange(table.num_rows), counts)
        index = np.arange(len(entry_row)) - first[entry_row]
        make = rows[entry_row] & (index < counts[entry_row] - 1) & ~done  # (a row's last entry: its error record)
        row, index = entry_row[make], index[make]
        take = pa.array(row, pa.int64())
        names = set(table.column_names)

        def taken(name: str, type_: pa.DataType) -> pa.Array:
            if name not in names:
                return pa.nulls(len(row), type_)
            return pc.take(table.column(name), take).combine_chunks().cast(type_)

        ids = taken("id", pa.string())
        seeds = pc.fill_null(taken("seed", pa.int64()), self.job_seed)
        columns = {
            "id": ids, "sample_index": pa.array(index, pa.int64()), "task": pc.take(tasks, take),
            "prompt": taken("prompt", pa.large_string()), "negative_prompt": taken("negative_prompt", pa.large_string()),
            "seed": seeds, "width": taken("width", pa.int32()), "height": taken("height", pa.int32()),
            "sample_seed": pa.array([sample_seed(seed, row_id, i) for seed, row_id, i in
                                     zip(seeds.to_pylist(), ids.to_pylist(), index.tolist())], pa.int64()),
            "covers": pa.array(np.ones(len(row), np.int32)), "ordinal": taken(ORDINAL, pa.int64()),
            "content": pa.array(contents[row], pa.uint64()), "params": pa.array([per_row[r] for r in row.tolist()], pa.large_binary()),
        }
        if self.extras:
            extras = {name: pc.take(table.column(col), take).to_pylist() for col, name in self.extras.items()}
            columns["rest"] = pa.array([pickle.dumps({"extras": dict(zip(extras, values))}, protocol=5) for values in zip(*extras.values())],
                                       pa.large_binary())
        return fresh_block(columns), row

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.end_ordinal is not None:
            table = table.filter(pc.less(table.column(ORDINAL), self.end_ordinal))
        contents = content_hashes(table, self.input_columns)
        done, first, counts = committed_pairs(table, self.duplicates, self.committed)
        bulk = self.passing(table)
        made, made_rows = self.samples_in_bulk(table, bulk, done, first, counts, contents)
        rest = np.flatnonzero(~bulk)
        out: list[Sample] = []
        out_rows: list[int] = []
        others = table.take(pa.array(rest, pa.int64()))
        for r, m, (todo, error_done) in zip(rest.tolist(), manifest_rows(others), self.pending(done, first, counts, rest)):
            before = len(out)
            self._expand_row(m, todo, error_done, int(contents[r]), out)
            out_rows += [r] * (len(out) - before)
        if not out:
            return made
        # in manifest order (each row's samples in order), as one block
        order = np.argsort(np.concatenate([made_rows, np.array(out_rows, np.int64)]), kind="stable")
        return pa.concat_tables([made, to_block(out)]).take(pa.array(order, pa.int64()))

    def _expand_row(self, m: dict, todo: list[int], error_done: bool, content: int, out: list[Sample]) -> None:
        """One row checked on its own: its samples still to make, or its error record."""
        if not todo and m[ORDINAL] not in self.duplicates:  # every sample committed: nothing to validate
            return
        extras = {name: m.get(col) for col, name in self.extras.items()}
        try:
            item = self.check(m)
        except RowError as e:
            if error_done:
                return
            # the record stands for all the pairs the plan expected of this row
            covers = 1 if m[ORDINAL] in self.duplicates else (samples_of(m.get("num_samples")) or 1)
            prompt = m.get("prompt") if isinstance(m.get("prompt"), str) else None
            key = -(self.duplicates.get(m[ORDINAL], 0) + 1)
            failed = Sample(id=m.get("id") or "", sample_index=key, task=str(m.get("task") or "t2i"), prompt=prompt,
                            extras=extras, covers=covers, ordinal=m[ORDINAL], content=content)
            failed.fail("validate", e.kind, str(e), e.retryable)
            out.append(failed)
            return
        item.pop("num_samples")  # `todo` holds the samples still to make
        for i in todo:
            out.append(Sample(id=m["id"], sample_index=i, sample_seed=sample_seed(item["seed"], m["id"], i),
                              extras=dict(extras), ordinal=m[ORDINAL], content=content, **item))


FIRST_ROWS = 1000  # rows the start-up check validates
SHOWN_COLUMNS = 30  # of a wide manifest, the first ones are named


def _hint(kind: str, manifest: Manifest) -> str:
    """What usually makes every row fail with `kind`: a column under another name."""
    column = {"empty_prompt": "prompt", "missing_id": "id"}.get(kind)
    if kind == "missing_input":
        absent = [c for c in manifest.input_columns if c not in manifest.schema.names]
        column = absent[0] if absent else "<input>"
    if column is None:
        return "fix the rows or the setting the message names"
    return f"if the {column} values are in another column, map it: --set manifest.columns.{column}=<column>"


def check_first_rows(manifest: Manifest, spec: JobSpec, duplicates: dict[int, int], n: int = FIRST_ROWS) -> None:
    """Before a job's first commit: when every one of the manifest's first rows (n, or all of
    them; at most one row group is read) fails validation with the same kind, no row would run,
    and a job would only write them all as errors and end as if it had worked: raise a
    ManifestError saying why instead. Mixed kinds, or any valid row, and the job runs."""
    table = manifest.first_rows(n)
    expand = Expand(spec.family, job_seed=spec.seed, sampler=spec.sampler, max_prompt_chars=spec.max_prompt_chars,
                    duplicates=duplicates, committed=KeySet(np.zeros(0, np.uint64)), extras={})
    first: tuple[dict, RowError] | None = None
    for m in manifest_rows(table):
        try:
            expand.check(m)
            return  # a valid row
        except RowError as e:
            first = first or (m, e)
            if e.kind != first[1].kind:
                return  # rows fail in more than one way: the manifest is not wrong as a whole
    assert first is not None, "a manifest has rows"
    row, error = first
    seen = table.num_rows
    rows = ("its only row fails" if manifest.num_rows == 1 else f"all {seen} rows fail" if seen == manifest.num_rows
            else f"all of its first {seen} rows fail")
    example = f"id {row['id']!r}" if row.get("id") else f"row {row[ORDINAL]}"
    names = [manifest.own_name(c) for c in manifest.schema.names]
    shown = ", ".join(names[:SHOWN_COLUMNS]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN_COLUMNS else "")
    message = " ".join(str(error).split())  # one line
    raise ManifestError(f"manifest {redact(manifest.url)}: {rows} validation as {error.kind} ({example}: {message}), so no row would run; "
                        f"its columns: {shown}; {_hint(error.kind, manifest)}")
