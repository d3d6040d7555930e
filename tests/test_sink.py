"""Shards: formats, deterministic names, commit-last, debris removal (no Ray)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.encode import encode_block
from pipeline.resume import committed_keys, list_commits, remove_debris
from pipeline.rows import from_block, to_block
from pipeline.sink import SinkConfig, write_shard


def rows(n=3, with_error=True):
    out = [{"id": f"a{i}", "sample_index": 0, "task": "t2i", "prompt": "p", "negative_prompt": None, "seed": 1, "sample_seed": i,
            "params": {"k": 1}, "extras": {"tag": f"t{i}"}, "pixels": np.full((4, 6, 3), 10 * i, np.uint8),
            "embeddings": {"e": np.arange(3, dtype=np.float32) + i}} for i in range(n)]
    if with_error:
        out.append({"id": "bad", "sample_index": -1, "task": "t2i", "prompt": "", "extras": {},
                    "error": {"stage": "validate", "kind": "empty_prompt", "message": "prompt is empty"}})
    return out


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_formats_and_shard_layout(tmp_path, fmt, pil):
    encoded = from_block(encode_block(to_block(rows()), image_format=fmt, quality=90))
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m", image_format=fmt, webdataset=True,
                     extra_schema=pa.schema([("tag", pa.string())]))
    stats = write_shard(encoded, cfg)
    assert stats["images"] == 3 and stats["errors"] == 1 and stats["pairs"] == 4
    name = stats["shard"]
    images = pq.read_table(tmp_path / "images" / f"{name}.parquet")
    assert images["tag"].to_pylist() == ["t0", "t1", "t2"] and images["format"].to_pylist() == [fmt] * 3
    img = Image.open(io.BytesIO(images["image"][0].as_py()))
    assert img.format == pil and img.size == (6, 4)
    assert pq.read_table(tmp_path / "errors" / f"{name}.parquet")["kind"].to_pylist() == ["empty_prompt"]
    assert (tmp_path / "webdataset" / f"{name}.tar").exists()
    assert [p.rsplit("/", 1)[-1] for p in list_commits(str(tmp_path))] == [f"{name}.parquet"]


def test_same_rows_same_shard_name_and_bytes(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    a = from_block(encode_block(to_block(rows()), image_format="png", quality=95))
    b = from_block(encode_block(to_block(list(reversed(rows()))), image_format="png", quality=95))
    assert write_shard(a, cfg)["shard"] == write_shard(b, cfg)["shard"]  # a retried write lands on the same files
    assert len(list_commits(str(tmp_path))) == 1


def test_uncommitted_files_are_debris(tmp_path):
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m")
    stats = write_shard(from_block(encode_block(to_block(rows(2, False)), image_format="png", quality=95)), cfg)
    (tmp_path / "images" / "part-deadbeef.parquet").write_bytes(b"half a shard")  # crashed before its commit
    (tmp_path / "images" / f"{stats['shard']}.parquet.tmp-123").write_bytes(b"temp")
    keys, commits = committed_keys(str(tmp_path))
    assert len(keys) == 2 and [c.name for c in commits] == [stats["shard"]]
    removed = remove_debris(str(tmp_path), {c.name for c in commits})
    assert sorted(p.rsplit("/", 1)[-1] for p in removed) == sorted(["part-deadbeef.parquet", f"{stats['shard']}.parquet.tmp-123"])
    assert (tmp_path / "images" / f"{stats['shard']}.parquet").exists()


def test_embedding_columns(tmp_path):
    """1-D embeddings are fixed-size float lists (a missing one is null); N-D ones keep their shape."""
    rs = rows(3, False)
    rs[0]["embeddings"]["latent"] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    rs[1]["embeddings"]["latent"] = np.ones((2, 1, 2), np.float32)
    del rs[2]["embeddings"]["e"]
    rs[2]["embeddings"]["latent"] = np.zeros((2, 1, 1), np.float32)
    cfg = SinkConfig(output=str(tmp_path), family="f", model="m", webdataset=True)
    name = write_shard(from_block(encode_block(to_block(rs), image_format="png", quality=95)), cfg)["shard"]
    emb = pq.read_table(tmp_path / "embeddings" / f"{name}.parquet")
    assert emb.schema.field("e").type == pa.list_(pa.float32(), 3)
    assert emb["e"].to_pylist() == [[0, 1, 2], [1, 2, 3], None]
    assert emb.schema.field("latent").type == pa.list_(pa.float32())
    assert emb["latent_shape"].to_pylist() == [[2, 3, 4], [2, 1, 2], [2, 1, 1]]
    first = np.asarray(emb["latent"][0].as_py(), np.float32).reshape(emb["latent_shape"][0].as_py())
    np.testing.assert_array_equal(first, rs[0]["embeddings"]["latent"])

    import tarfile
    with tarfile.open(tmp_path / "webdataset" / f"{name}.tar") as tar:
        npy = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".npy")}
    assert [v.shape for k, v in sorted(npy.items()) if k.endswith(".latent.npy")] == [(2, 3, 4), (2, 1, 2), (2, 1, 1)]


def test_an_embedding_of_varying_size_is_a_family_bug(tmp_path):
    rs = rows(2, False)
    rs[1]["embeddings"]["e"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="'e' has sizes \\[3, 5\\]"):
        write_shard(from_block(encode_block(to_block(rs), image_format="png", quality=95)),
                    SinkConfig(output=str(tmp_path), family="f", model="m"))
