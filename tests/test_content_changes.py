"""A content hash per manifest row (keys.content_hashes), recorded with every committed pair:
a resumed run reports the rows edited in place since their pairs were made, and makes
nothing of them again (issue 11)."""

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.driver import run_job
from pipeline.keys import content_hashes
from pipeline.resume import INDEX_FILE, list_commits, read_log
from pipeline.spec import load_spec
from tests.conftest import TOY

# --- the documented encoding, recomputed here from its description -------------------------


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 (Aumasson & Bernstein), straight from the paper."""
    mask = 2**64 - 1
    k0, k1 = struct.unpack("<QQ", key)
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    def sipround() -> None:
        v[0] = (v[0] + v[1]) & mask
        v[1] = rotl(v[1], 13) ^ v[0]
        v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & mask
        v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & mask
        v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & mask
        v[1] = rotl(v[1], 17) ^ v[2]
        v[2] = rotl(v[2], 32)

    end = len(data) - len(data) % 8
    words = [int.from_bytes(data[i: i + 8], "little") for i in range(0, end, 8)]
    words.append(((len(data) & 0xFF) << 56) | int.from_bytes(data[end:], "little"))
    for m in words:
        v[3] ^= m
        sipround()
        sipround()
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(4):
        sipround()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def H(data: bytes) -> int:
    """SipHash-2-4 with the key, then the finalizer (the splitmix64 mix pandas applies)."""
    mask = 2**64 - 1
    x = siphash24(b"0123456789123456", data)  # the documented key
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def le(x: int) -> bytes:
    return x.to_bytes(8, "little")


def struct_value(fields: dict[str, bytes | None]) -> bytes:
    """V(struct): H(name) H(V(value)) for each non-null field, by name."""
    return b"".join(le(H(name.encode())) + le(H(value)) for name, value in sorted(fields.items()) if value is not None)


def list_value(elements: list[bytes | None]) -> bytes:
    return b"".join(b"\x00" + le(0) if e is None else b"\x01" + le(H(e)) for e in elements)


def test_siphash_here_is_the_reference_one():
    # the paper's test vector (appendix A): key 00..0f, message 00..0e
    assert siphash24(bytes(range(16)), bytes(range(15))) == 0xA129CA6149BE45E5


def test_content_hashes_follow_the_documented_encoding():
    table = pa.table({
        "id": ["a", "b", "c"],
        "task": ["edit", None, "t2i"],
        "prompt": ["a cat", "ünïcode", ""],
        "negative_prompt": pa.array([None, "blur", None], pa.string()),
        "seed": pa.array([7, None, -3], pa.int64()),
        "width": pa.array([512.0, 2.5, None], pa.float64()),
        "params": ['{"size": 8}', None, "{}"],
        "num_samples": pa.array([2, 1, None], pa.int32()),
        "image": pa.array([b"\x89PNG", None, b""], pa.binary()),
        "caption": ["not content", "x", "y"],  # an extra column: carried, not content
    })
    expected = [
        H(struct_value({"task": b"edit", "prompt": b"a cat", "seed": b"7", "width": b"512", "params": b'{"size": 8}',
                        "num_samples": b"2", "image": b"\x89PNG"})),
        H(struct_value({"prompt": "ünïcode".encode(), "negative_prompt": b"blur", "width": b"f" + struct.pack("<d", 2.5),
                        "num_samples": b"1"})),
        H(struct_value({"task": b"t2i", "prompt": b"", "seed": b"-3", "params": b"{}", "image": b""})),
    ]
    assert content_hashes(table, ["image"]).tolist() == expected
    assert content_hashes(table.drop_columns(["caption", "negative_prompt"]), ["image"])[0] == expected[0]  # absent = null
    assert content_hashes(table.slice(1), ["image"]).tolist() == expected[1:]
    # a struct of params and a list of input images
    nested = pa.table({
        "prompt": ["p", "p"],
        "params": pa.array([{"size": 8, "gain": None, "fast": True}, {"size": 8, "gain": 0.5, "fast": False}]),
        "images": pa.array([[b"x", None], []], pa.list_(pa.binary())),
    })
    params = [struct_value({"size": b"8", "fast": b"true"}), struct_value({"size": b"8", "gain": b"f" + struct.pack("<d", 0.5),
                                                                           "fast": b"false"})]
    images = [list_value([b"x", None]), list_value([])]
    assert content_hashes(nested, ["images"]).tolist() == [
        H(struct_value({"prompt": b"p", "params": p, "images": i})) for p, i in zip(params, images)]


# --- jobs: edits in place are reported, not made again ------------------------------------------

ROWS = [{"id": f"r{i}", "prompt": f"prompt {i}", "num_samples": 2} for i in range(5)] + [{"id": "bad", "prompt": "", "num_samples": 2}]


def write(path: Path, rows: list[dict]) -> None:
    """Rewrite the manifest file in place; its mtime moves on, so its identity changes."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def spec_for(manifest: Path, output: Path):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": str(manifest), "output": str(output)},
                     ["stages.shade.device=cpu", "outputs.rows_per_shard=4"])


def shard_files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for d in ("images", "embeddings", "errors", "_commits")
            for p in sorted((output / d).glob("*"))}


def strip_content(path: Path) -> None:
    t = pq.read_table(path)
    pq.write_table(t.drop_columns(["content"]).replace_schema_metadata(t.schema.metadata), path)


def test_rows_edited_in_place_are_reported_and_not_made_again(ray_cluster, tmp_path, caplog):
    manifest, out = tmp_path / "m" / "part-0.parquet", tmp_path / "out"
    manifest.parent.mkdir()
    write(manifest, ROWS)
    first = run_job(spec_for(manifest, out), interactive=False)
    assert first["status"] == "completed" and (first["changed_rows"], first["changed_examples"]) == (0, [])
    records = pa.concat_tables([pq.read_table(p) for p in list_commits(str(out))])
    assert records.column("content").null_count == 0 and records.column("content").type == pa.uint64()
    assert "error" in records.column("status").to_pylist()  # the bad row's error record carries it too

    # the same rows rewritten: a new identity, every row group read again, and each hash
    # (made in the read tasks) matches the driver's
    write(manifest, ROWS)
    same = run_job(spec_for(manifest, out), interactive=False)
    assert same["status"] == "completed" and same["changed_rows"] == 0 and same["this_run"]["rows"] == 0
    made = shard_files(out)

    edited = [dict(r, prompt="prompt 1, edited") if r["id"] == "r1" else dict(r, prompt=" ") if r["id"] == "bad" else r for r in ROWS]
    write(manifest, edited)
    with caplog.at_level(logging.WARNING, logger="genfleet"):
        again = run_job(spec_for(manifest, out), interactive=False)
    assert again["status"] == "completed" and again["this_run"]["rows"] == 0
    assert again["changed_rows"] == 2 and again["changed_examples"] == ["r1", "bad"]
    assert json.loads((out / "_summary.json").read_text())["changed_examples"] == ["r1", "bad"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "changed since" in r.getMessage()]
    assert warnings == ["2 rows changed since they were made (e.g. id r1); they are not made again: give them new ids, or --new-run"]
    assert shard_files(out) == made  # nothing made again, nothing rewritten

    # a new row too: the run really runs (Ray), makes only the new row, and its summary still reports the two
    write(manifest, edited + [{"id": "new", "prompt": "a new one", "num_samples": 2}])
    grown = run_job(spec_for(manifest, out), interactive=False)
    assert grown["status"] == "completed" and grown["this_run"]["rows"] == 2
    assert (grown["changed_rows"], grown["changed_examples"]) == (2, ["r1", "bad"])
    assert {k: v for k, v in shard_files(out).items() if k in made} == made

    # records and an index of versions before content hashes: read back, nothing reported
    ok = read_log(str(out)).ok.hashes
    (out / INDEX_FILE).unlink()
    for p in list_commits(str(out)):
        strip_content(Path(p))
    old = run_job(spec_for(manifest, out), interactive=False)
    assert old["status"] == "completed" and old["changed_rows"] == 0
    strip_content(out / INDEX_FILE)  # (the run above folded the records into a new index)
    log = read_log(str(out))
    assert log.unindexed == 0 and log.table.column("content").null_count == log.table.num_rows
    assert np.array_equal(log.ok.hashes, ok) and len(ok) == 12
    assert run_job(spec_for(manifest, out), interactive=False)["changed_rows"] == 0
