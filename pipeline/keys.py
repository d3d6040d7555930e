"""Compact 64-bit keys for (id, sample_index) pairs, manifest ids and rows' content.

Resume and duplicate detection must scale to 10^7 rows without holding strings:
a sorted uint64 array costs 8 bytes a key. The hash is SipHash-2-4 with a fixed key,
then the splitmix64 finalizer (pandas' hash_array over str/bytes values, its key given
explicitly), identical in every process; at 10^7 keys the chance of any collision is
about 3e-6.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# SipHash-2-4's 16-byte key: pandas' default, pinned here because every key ever written depends on it
HASH_KEY = "0123456789123456"


def _siphash(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One hash per str (its UTF-8) or bytes value."""
    if len(strings) == 0:
        return np.zeros(0, np.uint64)
    # Arrow -> an object array of str/bytes in C, then pandas' SipHash over it: no per-row Python
    return pd.util.hash_array(strings.to_numpy(zero_copy_only=False), hash_key=HASH_KEY, categorize=False).astype(np.uint64)


def _arrow(values, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(list(values), type_)


def id_hashes(ids: Iterable[str | None] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One key per manifest id (a null id hashes as "")."""
    return _siphash(pc.fill_null(_arrow(ids, pa.string()), ""))


def pair_hashes(ids: Iterable[str] | pa.Array | pa.ChunkedArray, sample_indices: Iterable[int] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One key per (id, sample_index): the hash of f"{id}\x1f{sample_index}"."""
    ids, indices = _arrow(ids, pa.string()), _arrow(sample_indices, pa.int64())
    return _siphash(pc.binary_join_element_wise(ids, pc.cast(indices, pa.string()), "\x1f"))


# the runner's columns that change what a row makes (with the family's input columns)
CONTENT_FIELDS = ("task", "prompt", "negative_prompt", "seed", "width", "height", "params", "num_samples")


def content_hashes(table: pa.Table, input_columns: Iterable[str]) -> np.ndarray:
    """A 64-bit hash per manifest row of what it asks for, as given (nothing parsed or
    defaulted): CONTENT_FIELDS and the family's `input_columns`, in bulk. The encoding,
    stable across processes and versions (tests/test_content_changes.py recomputes it):

      H(b)          x = SipHash-2-4 of bytes b with the 16-byte key HASH_KEY (an unsigned 64-bit int), then
                    pandas' finalizer, mod 2^64: x ^= x >> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >> 27;
                    x *= 0x94D049BB133111EB; x ^= x >> 31
      the row       H(V(row)), the row taken as a struct of those columns (an absent column is null)
      V(string)     its UTF-8 bytes; V(binary): the bytes
      V(number)     an integer, or a float with an integer value below 2^63 in magnitude: its decimal
                    ASCII text ("-3", "512"); any other float: b"f" + its 8-byte little-endian IEEE 754
      V(bool)       b"true" or b"false"
      V(struct)     for each non-null field, in the order of the names' UTF-8 bytes: H(name) then
                    H(V(value)), each 8 bytes little-endian (so a null field and an absent one agree)
      V(list)       for each element: one byte (0: null, 1: not), then H(V(element)) as 8 bytes
                    little-endian (0 for a null)
      V(other)      (maps, dates, ...) its Python value as compact JSON (sorted keys, separators
                    "," and ":", unknown values as str()), UTF-8
    """
    names = sorted({*CONTENT_FIELDS, *input_columns} & set(table.column_names), key=lambda n: n.encode())
    return _siphash(_struct_bytes(names, [_plain(table.column(n)) for n in names], table.num_rows))


def _plain(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values


def _binary(values: np.ndarray, lengths: np.ndarray, valid: pa.Array | None = None) -> pa.Array:
    """Rows of `lengths` bytes each, taken in order from `values`, as a large_binary array."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    data = pa.py_buffer(np.ascontiguousarray(values).tobytes())
    out = pa.Array.from_buffers(pa.large_binary(), len(lengths), [None, pa.py_buffer(offsets.tobytes()), data])
    return out if valid is None else pc.if_else(valid, out, pa.scalar(None, pa.large_binary()))


def _hashed(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per value: is it not null, and H(V(value)) (0 for a null)."""
    v = _value_bytes(values)
    present = v.is_valid().to_numpy(zero_copy_only=False)
    return present, np.where(present, _siphash(pc.fill_null(v, pa.scalar(b"", pa.large_binary()))), 0).astype(np.uint64)


def _struct_bytes(names: Sequence[str], columns: Sequence[pa.Array], n: int, valid: pa.Array | None = None) -> pa.Array:
    present, records = np.zeros((n, len(names)), bool), np.zeros((n, len(names), 2), "<u8")
    for j, (name, col) in enumerate(zip(names, columns)):
        present[:, j], records[:, j, 1] = _hashed(col)
        records[:, j, 0] = _siphash(pa.array([name]))[0]
    return _binary(records[present], present.sum(axis=1) * 16, valid)


def _value_bytes(values: pa.Array) -> pa.Array:
    """V(value) per value, null where the value is null (large_binary)."""
    values = _plain(values)
    t, n = values.type, len(values)
    if pa.types.is_null(t):
        return pa.nulls(n, pa.large_binary())
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return values.cast(pa.large_binary())
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return values.cast(pa.string()).cast(pa.large_binary())
    if pa.types.is_floating(t):
        v = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(v) & (v == np.floor(v)) & (np.abs(v) < 2.0**63)
        text = pa.array(np.where(integral, v, 0).astype(np.int64)).cast(pa.string()).cast(pa.large_binary())
        raw = np.concatenate([np.full((n, 1), ord("f"), np.uint8), v.astype("<f8").view(np.uint8).reshape(n, 8)], axis=1)
        return pc.if_else(pc.and_(values.is_valid(), pa.array(integral)), text, _binary(raw, np.full(n, 9), values.is_valid()))
    if pa.types.is_struct(t):
        fields = [t.field(i).name for i in range(t.num_fields)]
        order = sorted(range(len(fields)), key=lambda i: fields[i].encode())
        children = values.flatten()
        return _struct_bytes([fields[i] for i in order], [children[i] for i in order], n, values.is_valid())
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        present, hashes = _hashed(values.flatten())
        records = np.concatenate([present[:, None].astype(np.uint8), hashes.astype("<u8").view(np.uint8).reshape(-1, 8)], axis=1)
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False)
        return _binary(records, lengths * 9, values.is_valid())
    text = [None if x is None else json.dumps(x, sort_keys=True, separators=(",", ":"), default=str) for x in values.to_pylist()]
    return pa.array(text, pa.string()).cast(pa.large_binary())


class KeySet:
    """A frozen set of pair hashes (sorted array, binary search)."""

    def __init__(self, hashes: np.ndarray):
        # sort, then drop repeats: numpy's own unique hashes first, many times slower at 10^7 keys
        h = np.sort(hashes.astype(np.uint64, copy=False))
        if len(h) > 1:
            distinct = np.empty(len(h), bool)
            distinct[0] = True
            np.not_equal(h[1:], h[:-1], out=distinct[1:])
            if not distinct.all():
                h = h[distinct]
        self.hashes = h

    def __len__(self) -> int:
        return len(self.hashes)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        if len(self.hashes) == 0:
            return np.zeros(len(hashes), bool)
        pos = np.searchsorted(self.hashes, hashes)
        pos[pos == len(self.hashes)] = 0
        return self.hashes[pos] == hashes


def shard_name(keys: Iterable[tuple[str, int]]) -> str:
    """A shard's name from the keys it holds, so that a retried write lands on the same
    files. Each key is hashed on its own (length-prefixed id, so no id can spell a
    separator), and the name hashes the sorted key digests: no two key sets share it."""
    digests = sorted(
        hashlib.blake2b(len(raw).to_bytes(8, "little") + raw + int(s).to_bytes(8, "little", signed=True), digest_size=16).digest()
        for raw, s in ((i.encode("utf-8", "surrogatepass"), s) for i, s in keys)
    )
    return "part-" + hashlib.blake2b(b"".join(digests), digest_size=10).hexdigest()
