"""Manifests: Parquet files (one file, a directory/prefix of shards, or a glob).

Whole-manifest problems (unreadable file, no `id` column, wrong column types,
no rows, a column mapping that does not fit) raise ManifestError before any model
loads. Row problems are left to pipeline.validate. Reading is by row group,
streaming, with each row's global ordinal (file order is sorted, so ordinals are
stable across runs).

A column mapping (`manifest.columns`: the runner's name -> the manifest's) is applied
here, to the schemas and to every table read: everything downstream sees only the
runner's names.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem, redact

READ_BATCH_ROWS = 1024
ORDINAL = "__genfleet_ordinal"  # the runner's own column: a row's position in the manifest
INTERNAL_PREFIX = "__genfleet"
KEY_COLUMNS = ("id", "num_samples")  # a row's pair keys: its id and how many samples it asks for


def _is_str(t):
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bin_or_str(t):
    return _is_str(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_number(t):
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_list_of_inputs(t):
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (_is_bin_or_str(t.value_type) or pa.types.is_null(t.value_type))


INPUT = (_is_bin_or_str, "binary (image bytes) or string (URL)")
INPUT_LIST = (_is_list_of_inputs, "list of binary (image bytes) or string (URL)")
# the runner's columns -> (accepts type?, what we say we expect)
RUNNER_COLUMNS = {
    "id": (_is_str, "string"),
    "task": (_is_str, "string"),
    "prompt": (_is_str, "string"),
    "negative_prompt": (_is_str, "string"),
    "seed": (_is_number, "int64"),
    "num_samples": (_is_number, "integer"),
    "width": (_is_number, "integer"),
    "height": (_is_number, "integer"),
    "params": (lambda t: _is_str(t) or pa.types.is_struct(t) or pa.types.is_map(t), "string (JSON object) or struct"),
}


class ManifestError(ValueError):
    """The manifest cannot be used at all; names the file and the column."""


@dataclass(frozen=True)
class ManifestFile:
    path: str  # inside the manifest's filesystem
    num_rows: int
    row_groups: tuple[int, ...]  # rows per row group
    first_ordinal: int
    identity: str = ""  # its path below the manifest root, size and version: changes when the file does
    rel: str = ""  # its path below the manifest root (what the run history names it by)

    def group_starts(self) -> np.ndarray:
        """Each row group's first row, within the file."""
        return np.cumsum((0, *self.row_groups[:-1]), dtype=np.int64)


@dataclass(frozen=True)
class Manifest:
    url: str
    protocol_prefix: str  # "s3://" etc. ("" for local paths): rebuilds full URLs
    files: tuple[ManifestFile, ...]
    schema: pa.Schema  # unified schema of all files, under the runner's names
    input_columns: tuple[str, ...] = ()  # the family's input columns (image, mask, images, ...)
    columns: dict[str, str] = field(default_factory=dict)  # the mapping: the runner's name -> the manifest's column

    def own_name(self, name: str) -> str:
        """What the manifest itself calls the runner's column `name`."""
        return self.columns.get(name, name)

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def extra_columns(self) -> list[str]:
        """Columns neither the runner nor the family reads: carried to the outputs."""
        return [n for n in self.schema.names if n not in RUNNER_COLUMNS and n not in self.input_columns]

    @property
    def key_columns(self) -> list[str]:
        """What a row's (id, sample) pair keys are made of: `id`, and `num_samples` where the manifest has it."""
        return [c for c in KEY_COLUMNS if c in self.schema.names]

    def url_of(self, f: ManifestFile) -> str:
        return self.protocol_prefix + f.path

    def first_rows(self, n: int) -> pa.Table:
        """The manifest's first rows, with ORDINAL: n, or fewer when its first row group (of the
        first file that has rows) holds fewer. A sample that reads no more than that."""
        f = next(f for f in self.files if f.num_rows)
        group = next(g for g, rows in enumerate(f.row_groups) if rows)
        url = self.url_of(f)
        fs, _ = filesystem(url)
        with fs.open(f.path, "rb") as fh:
            batches = pq.ParquetFile(fh).iter_batches(batch_size=min(n, f.row_groups[group]), row_groups=[group])
            try:  # the first batch only: the reader streams the group's pages, it does not load the whole group
                batch = next(batches)
            except (OSError, pa.ArrowException) as e:
                raise _unreadable(url, group, e) from None
        start = f.first_ordinal + int(f.group_starts()[group])
        table = _as_runner_names(pa.Table.from_batches([batch]), self.columns)
        return table.append_column(ORDINAL, pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))


def _hidden(path: str, root: str) -> bool:
    """Spark's `_SUCCESS` and `_temporary/`, `.crc` files, ...: any component of the path
    below the manifest root that starts with `_` or `.` is not data (as Arrow and Spark read it)."""
    rel = path[len(root):].strip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _version(info: dict) -> str:
    """What changes when a file is rewritten: an object store's ETag, else the mtime."""
    for name in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(name) is not None:
            return str(info[name])
    return ""


def file_identity(rel: str, info: dict) -> str:
    return hashlib.blake2b(f"{rel}\x1f{info.get('size')}\x1f{_version(info)}".encode(), digest_size=8).hexdigest()


def _list_files(url: str) -> tuple[fsspec.AbstractFileSystem, str, dict[str, dict]]:
    """The manifest's data files (path -> fsspec info, sorted) and the root they sit under."""
    fs, path = filesystem(url)
    if any(c in path for c in "*?["):
        base = path[: min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
        files = {p: i for p, i in found.items() if i.get("type") != "directory" and not _hidden(p, base)}
    elif fs.isdir(path):
        base = path
        files = {p: i for p, i in fs.find(path, detail=True).items() if p.endswith(".parquet") and not _hidden(p, path)}
    elif fs.exists(path):
        base = path.rsplit("/", 1)[0]
        files = {path: fs.info(path)}
    else:
        raise ManifestError(f"manifest {redact(url)}: no such file or directory")
    if not files:
        raise ManifestError(f"manifest {redact(url)}: no Parquet files found")
    return fs, base, dict(sorted(files.items()))


def _label(name: str, columns: Mapping[str, str]) -> str:
    """A column as the user knows it: its own name, and the runner's when it is mapped."""
    return f"'{columns[name]}' (manifest.columns.{name})" if name in columns else f"'{name}'"


def _check_schema(where: str, schema: pa.Schema, types: dict, columns: Mapping[str, str]) -> None:
    """`schema` under the runner's names (the mapping applied); messages name the manifest's own."""
    if "id" not in schema.names:
        own = [columns.get(n, n) for n in schema.names]
        raise ManifestError(f"manifest file {where}: required column 'id' is missing (columns: {', '.join(own)}); "
                            "if the ids are in another column, map it: --set manifest.columns.id=<column>")
    for name in schema.names:
        if name.startswith(INTERNAL_PREFIX):
            raise ManifestError(f"manifest file {where}: column '{name}' uses the runner's reserved prefix {INTERNAL_PREFIX!r}")
        if name in types:
            t = schema.field(name).type
            ok, expected = types[name]
            if not (ok(t) or pa.types.is_null(t)):
                raise ManifestError(f"manifest file {where}: column {_label(name, columns)} has type {t}, expected {expected}")


def _check_mapping(columns: Mapping[str, str], types: dict) -> None:
    """What can be said of the mapping before any file is read."""
    for name, own in columns.items():
        if name not in types:
            # the mapping the other way round is the likely slip
            turned = f"; the other way round: manifest.columns.{own}={name}" if own in types else ""
            raise ManifestError(f"manifest.columns.{name}: not a column genfleet reads; map one of: {', '.join(types)}{turned}")
    for own, count in Counter(columns.values()).items():
        if count > 1:
            names = ", ".join(f"manifest.columns.{n}" for n, o in columns.items() if o == own)
            raise ManifestError(f"{names}: all name column '{own}'; one manifest column stands for one column only")


def _map_schema(where: str, schema: pa.Schema, columns: Mapping[str, str]) -> pa.Schema:
    """One file's schema under the runner's names; its columns must fit the mapping."""
    for name, own in columns.items():
        if own not in schema.names:
            raise ManifestError(f"manifest file {where}: column '{own}' (manifest.columns.{name}) is missing "
                                f"(columns: {', '.join(schema.names)}); set manifest.columns.{name} to one of them")
        # a column of the runner's name that the mapping does not itself move elsewhere (a swap is fine)
        if name in schema.names and name not in columns.values():
            raise ManifestError(f"manifest file {where}: has both a '{name}' column and '{own}' (manifest.columns.{name}): "
                                f"which one is the {name} is ambiguous; drop the mapping or rename one of them")
    renames = _renames(columns)
    return pa.schema([f.with_name(renames.get(f.name, f.name)) for f in schema], metadata=schema.metadata)


def _renames(mapping: Mapping[str, str]) -> dict[str, str]:
    """The manifest's column -> the runner's name."""
    return {own: name for name, own in mapping.items()}


def _as_runner_names(table: pa.Table, mapping: Mapping[str, str]) -> pa.Table:
    renames = _renames(mapping)
    return table.rename_columns([renames.get(n, n) for n in table.column_names]) if renames else table


def open_manifest(url: str, inputs: dict[str, bool] | None = None, columns: Mapping[str, str] | None = None) -> Manifest:
    """List and validate every file's footer (no row data is read). `inputs`: the
    family's input columns, name -> True when the column holds a list of images.
    `columns`: the mapping (the runner's name -> the manifest's column)."""
    inputs, columns = inputs or {}, dict(columns or {})
    types = {**RUNNER_COLUMNS, **{name: INPUT_LIST if many else INPUT for name, many in inputs.items()}}
    _check_mapping(columns, types)
    fs, base, infos = _list_files(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url and not url.startswith("file://") else ""
    files, schemas, ordinal = [], [], 0
    for p, info in infos.items():
        where = redact(protocol + p)
        try:
            with fs.open(p, "rb") as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 - any failure here makes the file unusable
            raise ManifestError(f"manifest file {where}: unreadable as Parquet ({type(e).__name__}: {redact(str(e))})") from None
        schema = _map_schema(where, schema, columns)
        _check_schema(where, schema, types, columns)
        groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        rel = p[len(base):].lstrip("/") if p.startswith(base) else p
        files.append(ManifestFile(p, meta.num_rows, groups, ordinal, file_identity(rel, info), rel))
        schemas.append((where, schema))
        ordinal += meta.num_rows
    try:
        unified = pa.unify_schemas([s for _, s in schemas], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ManifestError(f"manifest {redact(url)}: files disagree on column types: {e}") from None
    _check_schema(redact(url), unified, types, columns)
    if ordinal == 0:
        raise ManifestError(f"manifest {redact(url)}: is empty (0 rows in {len(files)} file(s))")
    return Manifest(url, protocol, tuple(files), unified, tuple(inputs), columns)


def output_names(extras: list[str], reserved: set[str]) -> dict[str, str]:
    """Manifest extra column -> its name in the outputs: one that would replace an output
    column of the job's own (`model`, `sample_index`, ...) is carried as `extra_<name>`."""
    names = {c: f"extra_{c}" if c in reserved else c for c in extras}
    clash = [c for c, n in names.items() if n != c and n in extras]
    if clash:
        raise ManifestError(f"manifest columns {', '.join(repr(c) for c in clash)} collide with output columns, and "
                            f"'extra_<name>' is taken too: rename them")
    return names


def _unreadable(url: str, group: int, e: Exception) -> ManifestError:
    return ManifestError(f"manifest file {redact(url)}: row group {group} is unreadable ({type(e).__name__}: {redact(str(e))[:300]})")


def read_file_rows(url: str, f: ManifestFile, columns: list[str] | None = None,
                   skip_groups: frozenset[int] = frozenset(), mapping: Mapping[str, str] | None = None) -> Iterator[pa.Table]:
    """Stream one manifest file as tables with an ORDINAL column, row group by row group
    (`skip_groups`: row groups a resumed run has nothing left to do in: never read); a row
    group that cannot be read fails naming the file and the group. `mapping`: the column
    mapping (Manifest.columns); `columns` and the tables are under the runner's names."""
    mapping = mapping or {}
    if columns is not None:
        columns = [mapping.get(c, c) for c in columns]
    fs, _ = filesystem(url)
    starts = f.first_ordinal + f.group_starts()
    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        for group in range(pf.num_row_groups):
            if group in skip_groups:
                continue
            try:
                batches = list(pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=columns))
            except (OSError, pa.ArrowException) as e:
                raise _unreadable(url, group, e) from None
            ordinal = int(starts[group])
            for batch in batches:
                table = _as_runner_names(pa.Table.from_batches([batch]), mapping)
                n = table.num_rows
                yield table.append_column(ORDINAL, pa.array(np.arange(ordinal, ordinal + n, dtype=np.int64)))
                ordinal += n


def read_group_columns(url: str, f: ManifestFile, columns: list[str],
                       mapping: Mapping[str, str] | None = None) -> Iterator[tuple[int, pa.Table]]:
    """Whole row groups of a few columns (the plan's pass over the ids), with their index;
    `columns` and the tables under the runner's names, as in read_file_rows."""
    mapping = mapping or {}
    fs, _ = filesystem(url)
    with fs.open(f.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        for group in range(pf.num_row_groups):
            try:
                yield group, _as_runner_names(pf.read_row_group(group, columns=[mapping.get(c, c) for c in columns]), mapping)
            except (OSError, pa.ArrowException) as e:
                raise _unreadable(url, group, e) from None
