"""The reliability suite reuses tests/conftest.py (moto behind the FaultProxy, the session Ray);
this adds what several of its tests read."""

from __future__ import annotations

import pytest

from pipeline.resume import list_commits, shard_of
from pipeline.storage import filesystem
from tests.test_job_s3 import read


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The session Ray's address, for driver processes that join it (no Ray start of their own)."""
    return ray_cluster.get_runtime_context().gcs_address


def keys_of(table) -> list[tuple[str, int]]:
    return list(zip(table["id"].to_pylist(), table["sample_index"].to_pylist()))


def images_by_key(output: str) -> dict[tuple[str, int], dict]:
    """Every image of an output by (id, sample_index); a pair written twice fails here."""
    table = read(output, "images")
    if table is None:
        return {}
    keys = keys_of(table)
    assert len(keys) == len(set(keys)), f"a pair was written twice in {output}"
    return dict(zip(keys, table["image"].to_pylist()))


def assert_no_debris(output: str) -> None:
    """Every shard file belongs to a committed shard."""
    committed = {shard_of(p) for p in list_commits(output)}
    fs, root = filesystem(output)
    fs.invalidate_cache(root)
    for f in fs.find(root):
        rel = f[len(root) + 1:]
        # _plan/: per manifest file, _runs/: per run; neither holds shards
        if "/" in rel and not rel.startswith(("retired_errors/", "_plan/", "_runs/")):
            assert shard_of(rel) in committed, f"{rel} has no commit record"
