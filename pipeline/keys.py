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


def id_hashes(ids: Iterable[str | None]) -> np.ndarray:
    arr = np.array(["" if i is None else i for i in ids], dtype=object)
    return pd.util.hash_array(arr, categorize=False).astype(np.uint64)


def pair_hashes(ids: Iterable[str], sample_indices: Iterable[int]) -> np.ndarray:
    arr = np.array([f"{i}\x1f{s}" for i, s in zip(ids, sample_indices)], dtype=object)
    if len(arr) == 0:
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(arr, categorize=False).astype(np.uint64)


class KeySet:
    """A frozen set of pair hashes (sorted array, binary search)."""

    def __init__(self, hashes: np.ndarray):
        self.hashes = np.unique(hashes.astype(np.uint64))

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
