"""Compact 64-bit keys for (id, sample_index) pairs and manifest ids.

Resume and duplicate detection must scale to 10^7 rows without holding strings:
a sorted uint64 array costs 8 bytes a key. The hash is SipHash (pandas'
hash_array with its fixed key), identical in every process; at 10^7 keys the
chance of any collision is about 3e-6.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def _siphash(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if len(strings) == 0:
        return np.zeros(0, np.uint64)
    # Arrow -> an object array of str in C, then pandas' SipHash over it: no per-row Python
    return pd.util.hash_array(strings.to_numpy(zero_copy_only=False), categorize=False).astype(np.uint64)


def _arrow(values, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(list(values), type_)


def id_hashes(ids: Iterable[str | None] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One key per manifest id (a null id hashes as "")."""
    return _siphash(pc.fill_null(_arrow(ids, pa.string()), ""))


def pair_hashes(ids: Iterable[str] | pa.Array | pa.ChunkedArray, sample_indices: Iterable[int] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One key per (id, sample_index): the hash of f"{id}\x1f{sample_index}"."""
    ids, indices = _arrow(ids, pa.string()), _arrow(sample_indices, pa.int64())
    return _siphash(pc.binary_join_element_wise(ids, pc.cast(indices, pa.string()), "\x1f"))


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
