"""Shards: formats, deterministic names, commit-last, statuses, debris removal (no Ray)."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.encode import encode_block
from pipeline.family import Params
from pipeline.keys import pair_hashes, shard_name
from pipeline.resume import list_commits, read_log, remove_debris, retire_errors
from pipeline.rows import from_block, to_block
from pipeline.sample import Outputs, Sample
from pipeline.sink import SinkConfig, sample_key, write_shard


class P(Params):
    k: int = 1


def sample(i, **kw):
    return Sample(id=f"a{i}", sample_index=0, task="t2i", prompt="p", seed=1, sample_seed=i, params=P(), extras={"tag": f"t{i}"},
                  outputs=Outputs(pixels=np.full((4, 6, 3), 10 * i, np.uint8), embeddings={"e": np.arange(3, dtype=np.float32) + i}),
                  **kw)


def failed(row_id, kind="empty_prompt", retryable=False, sample_index=-1, covers=1):
    s = Sample(id=row_id, sample_index=sample_index, task="t2i", prompt="", covers=covers)
    s.fail("validate", kind, "prompt is empty", retryable)
    return s


def rows(n=3, with_error=True):
    return [sample(i) for i in range(n)] + ([failed("bad")] if with_error else [])


def encoded(rs, fmt="png"):
    return from_block(encode_block(to_block(rs), image_format=fmt, quality=90))


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_formats_and_shard_layout(tmp_path, fmt, pil):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m", image_format=fmt, webdataset=True,
                     extra_schema=pa.schema([("tag", pa.string())]))
    result = write_shard(to_block(encoded(rows(), fmt)), cfg)
    assert result.images == 3 and result.errors == 1 and result.pairs == 4 and result.errors_by_kind == {"empty_prompt": 1}
    name = result.shard
    images = pq.read_table(tmp_path / "images" / f"{name}.parquet")
    assert images["tag"].to_pylist() == ["t0", "t1", "t2"] and images["format"].to_pylist() == [fmt] * 3
    assert json.loads(images["sampler"][0].as_py()) == {"k": 1}
    img = Image.open(io.BytesIO(images["image"][0].as_py()["bytes"]))
    assert img.format == pil and img.size == (6, 4) and images["width"][0].as_py() == 6
    assert pq.read_table(tmp_path / "errors" / f"{name}.parquet")["kind"].to_pylist() == ["empty_prompt"]
    assert (tmp_path / "webdataset" / f"{name}.tar").exists()
    assert [p.rsplit("/", 1)[-1] for p in list_commits(str(tmp_path))] == [f"{name}.parquet"]


def test_same_rows_same_shard_name(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    a, b = encoded(rows()), encoded(list(reversed(rows())))
    assert write_shard(to_block(a), cfg).shard == write_shard(to_block(b), cfg).shard  # a retried write lands on the same files
    assert len(list_commits(str(tmp_path))) == 1


def test_shard_names_cannot_be_forged_by_ids():
    """Ids may hold any bytes: the name hashes each key on its own, so no set of ids spells another set."""
    evil = [("p", 0), ("x", 0), ("y", 0)]
    forged = [("p\x1f0\x1ex\x1f0\x1ey", 0)]
    assert shard_name(evil) != shard_name(forged)
    assert shard_name([("a", 1)]) != shard_name([("a\x1f1", 0)]) != shard_name([("a", 10)])
    assert shard_name([("a", 0), ("b", 0)]) == shard_name([("b", 0), ("a", 0)])
    # golden: the name of a key set never changes across versions (a retried write must land on the same files)
    assert shard_name([("r00", 0), ("r00", 1)]) == "part-e7fad8fdc6ae94f31161"
    key = lambda i, s: hashlib.blake2b(len(i).to_bytes(8, "little") + i.encode() + s.to_bytes(8, "little"), digest_size=16).digest()  # noqa: E731
    spelled = hashlib.blake2b(b"".join(sorted([key("r00", 0), key("r00", 1)])), digest_size=10).hexdigest()
    assert shard_name([("r00", 1), ("r00", 0)]) == f"part-{spelled}"


def test_statuses_in_the_commit_record_and_the_log(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    rs = rows(2, False) + [failed("bad", covers=3), failed("flaky", "input_unavailable", retryable=True, sample_index=0)]
    for i, s in enumerate(rs):
        s.content = 2**64 - 1 - i  # each record carries its row's content hash (uint64), error records too
    result = write_shard(to_block(encoded(rs)), cfg)
    assert (result.pairs, result.errors, result.retryable) == (5, 1, 1)  # the bad row stands for its 3 pairs
    assert result.retryable_by_kind == {"input_unavailable": 1}
    assert pq.read_table(tmp_path / "retries" / f"{result.shard}.parquet")["id"].to_pylist() == ["flaky"]
    log = read_log(str(tmp_path))
    assert (len(log.ok), len(log.errors), len(log.retry)) == (2, 1, 1)
    by_key = dict(zip(log.table.column("key").to_pylist(), log.table.column("content").to_pylist()))
    assert [by_key[k] for k in pair_hashes([s.id for s in rs], [s.sample_index for s in rs]).tolist()] == [s.content for s in rs]
    assert len(log.done()) == 3 and len(log.done(retry_errors=True)) == 2
    # the transient failure made later: no longer pending
    later = sample(9)
    later.id = "flaky"
    write_shard(to_block(encoded([later])), cfg)
    assert len(read_log(str(tmp_path)).retry) == 0


def test_uncommitted_files_are_debris(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    result = write_shard(to_block(encoded(rows(2, False))), cfg)
    (tmp_path / "images" / "part-deadbeef.parquet").write_bytes(b"half a shard")  # crashed before its commit
    (tmp_path / "images" / f"{result.shard}.parquet.tmp-123").write_bytes(b"temp")
    (tmp_path / "_commits" / "part-cafe.parquet.tmp-9").write_bytes(b"half a commit")
    (tmp_path / "_job.json.tmp-1").write_bytes(b"{")
    (tmp_path / "_summary.json.tmp-2").write_bytes(b"{")
    log = read_log(str(tmp_path))
    assert len(log.ok) == 2 and [c.name for c in log.commits] == [result.shard]
    removed = remove_debris(str(tmp_path), log.commits)
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == sorted(["part-deadbeef.parquet", f"{result.shard}.parquet.tmp-123",
                                                                    "part-cafe.parquet.tmp-9", "_job.json.tmp-1", "_summary.json.tmp-2"])
    assert (tmp_path / "images" / f"{result.shard}.parquet").exists()


def test_retire_errors_sets_them_aside_and_survives_a_crash_midway(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    result = write_shard(to_block(encoded(rows(2) + [failed("worse", covers=2)])), cfg)
    commits = read_log(str(tmp_path)).commits
    retired = retire_errors(str(tmp_path), commits)
    assert (retired[0].result.errors, retired[0].result.pairs, retired[0].result.images) == (0, 2, 2)
    log = read_log(str(tmp_path))
    assert (len(log.ok), len(log.errors)) == (2, 0) and len(log.done()) == 2
    assert not (tmp_path / "errors" / f"{result.shard}.parquet").exists()
    assert sorted(pq.read_table(tmp_path / "retired_errors" / f"{result.shard}.parquet")["id"].to_pylist()) == ["bad", "worse"]
    # a crash after the commit was rewritten but before errors/ was removed: debris removal finishes it
    (tmp_path / "errors").mkdir(exist_ok=True)
    (tmp_path / "errors" / f"{result.shard}.parquet").write_bytes(b"stale")
    remove_debris(str(tmp_path), read_log(str(tmp_path)).commits)
    assert not (tmp_path / "errors" / f"{result.shard}.parquet").exists()


def test_embedding_columns(tmp_path):
    """1-D embeddings are fixed-size float lists (a missing one is null); N-D ones keep their shape."""
    rs = rows(3, False)
    rs[0].outputs.embeddings["latent"] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    rs[1].outputs.embeddings["latent"] = np.ones((2, 1, 2), np.float32)
    del rs[2].outputs.embeddings["e"]
    rs[2].outputs.embeddings["latent"] = np.zeros((2, 1, 1), np.float32)
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m", webdataset=True)
    name = write_shard(to_block(encoded(rs)), cfg).shard
    emb = pq.read_table(tmp_path / "embeddings" / f"{name}.parquet")
    assert emb.schema.field("e").type == pa.list_(pa.float32(), 3)
    assert emb["e"].to_pylist() == [[0, 1, 2], [1, 2, 3], None]
    assert emb.schema.field("latent").type == pa.list_(pa.float32())
    assert emb["latent_shape"].to_pylist() == [[2, 3, 4], [2, 1, 2], [2, 1, 1]]
    first = np.asarray(emb["latent"][0].as_py(), np.float32).reshape(emb["latent_shape"][0].as_py())
    np.testing.assert_array_equal(first, rs[0].outputs.embeddings["latent"])
    with tarfile.open(tmp_path / "webdataset" / f"{name}.tar") as tar:
        npy = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".npy")}
    assert [v.shape for k, v in sorted(npy.items()) if k.endswith(".latent.npy")] == [(2, 3, 4), (2, 1, 2), (2, 1, 1)]


def test_an_embedding_of_varying_size_is_a_family_bug(tmp_path):
    rs = rows(2, False)
    rs[1].outputs.embeddings["e"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="'e' has sizes \\[3, 5\\]"):
        write_shard(to_block(encoded(rs)), SinkConfig(output=str(tmp_path), family="f", model="m"))


def test_webdataset_keys_stay_short_and_distinct(tmp_path):
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(sample_key(long_a, 3)) <= 80 and sample_key(long_a, 3) != sample_key(long_b, 3)
    assert sample_key("plain-id_1", 2) == "plain-id_1_0002"  # short safe ids keep their readable key
    rs = rows(2, False)
    rs[0].id, rs[1].id = long_a, long_b
    name = write_shard(to_block(encoded(rs)), SinkConfig(output=str(tmp_path), family="f", model="m", webdataset=True)).shard
    with tarfile.open(tmp_path / "webdataset" / f"{name}.tar") as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(m["id"] for m in metas) == sorted([long_a, long_b])
