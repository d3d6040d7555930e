"""What makes start-up cheap at scale, as behaviour (times are measured in bench/bench_scale.py):
a re-run with nothing to do starts no Ray; a resumed run never reads manifest row groups
whose pairs are all committed (nor their ids: the plan is cached per file); the commit
log's index and older commit records read back the same keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.driver import run_job
from pipeline.keys import pair_hashes
from pipeline.manifest import open_manifest
from pipeline.plan import PLAN_DIR, make_plan, save_cache
from pipeline.resume import INDEX_FILE, list_commits, read_log
from pipeline.spec import load_spec
from tests.conftest import ROOT, TOY


def rows(prefix: str, n: int, **extra) -> list[dict]:
    return [{"id": f"{prefix}{i:03d}", "prompt": f"prompt {prefix} {i}", "num_samples": 2, **extra} for i in range(n)]


def write(path: Path, data: list[dict], row_group_size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(data), path, row_group_size=row_group_size)
    return path


def spec_for(manifest, output, *sets):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": str(manifest), "output": str(output)},
                     ["stages.shade.device=cpu", "outputs.rows_per_shard=8", *sets])


def committed_keys(output) -> set[tuple[str, int]]:
    return {(r["id"], r["sample_index"]) for p in list_commits(str(output)) for r in pq.read_table(p, columns=["id", "sample_index"]).to_pylist()}


def scramble_data_pages(path: Path) -> None:
    """Overwrite a Parquet file's column data, keeping its footer, size and mtime: the file
    still lists (same identity) and its footer reads, but any row group read fails."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    data[4: len(data) - 8 - footer_len] = b"\xff" * (len(data) - 12 - footer_len)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rerun_with_nothing_to_do_starts_no_ray_and_the_index_reads_as_the_records(ray_cluster, tmp_path):
    manifest = write(tmp_path / "m" / "part-0.parquet", rows("a", 6) + [{"id": "bad", "prompt": "", "num_samples": 2}], row_group_size=4)
    out = tmp_path / "out"
    assert run_job(spec_for(manifest, out), interactive=False)["status"] == "completed"
    assert (out / INDEX_FILE).exists() and list((out / PLAN_DIR).iterdir())
    # RAY_ADDRESS points at a port nothing listens on: starting or joining Ray would fail the run
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", str(manifest),
                           "--output", str(out), "--set", "stages.shade.device=cpu", "--set", "outputs.rows_per_shard=8"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["status"] == "completed" and summary["committed"] == summary["expected"] == 14  # the bad row stands for its 2 pairs
    assert summary["this_run"]["rows"] == 0

    indexed = read_log(str(out))
    assert indexed.unindexed == 0 and len(indexed.ok) == 12 and len(indexed.errors) == 1
    assert np.array_equal(indexed.ok.hashes, np.unique(pair_hashes([f"a{i:03d}" for i in range(6) for _ in (0, 1)], [0, 1] * 6)))
    (out / INDEX_FILE).unlink()
    # records as written before the key/file/row columns: keys hashed from id and sample_index
    for p in list_commits(str(out)):
        t = pq.read_table(p)
        pq.write_table(t.drop_columns(["key", "file", "row"]).replace_schema_metadata(t.schema.metadata), p)
    plain = read_log(str(out))
    assert plain.unindexed == len(indexed.commits)
    for name in ("ok", "errors", "retry"):
        assert np.array_equal(getattr(plain, name).hashes, getattr(indexed, name).hashes)
    assert [c.result for c in plain.commits] == [c.result for c in indexed.commits]


def test_resumed_and_nightly_runs_read_only_what_is_left(ray_cluster, tmp_path):
    """Night 1 makes files 0 and 1; their data pages are then made unreadable (footers intact,
    same size and mtime), and night 2 adds file 2: it must complete without reading 0 or 1.
    Then one of file 2's shards is forgotten (a crash before its record): only the row groups
    holding its pairs are read again."""
    m = tmp_path / "m"
    old = [write(m / "part-0.parquet", rows("a", 10), row_group_size=3), write(m / "part-1.parquet", rows("b", 5), row_group_size=5)]
    out = tmp_path / "out"
    first = run_job(spec_for(m, out), interactive=False)
    assert first["status"] == "completed" and first["committed"] == 30
    for p in old:
        scramble_data_pages(p)
    new = write(m / "part-2.parquet", rows("c", 9), row_group_size=3)
    second = run_job(spec_for(m, out), interactive=False)
    assert second["status"] == "completed" and second["committed"] == second["expected"] == 48
    assert second["this_run"]["rows"] == 18
    want = {(f"{p}{i:03d}", s) for p, n in (("a", 10), ("b", 5), ("c", 9)) for i in range(n) for s in (0, 1)}
    assert committed_keys(out) == want

    victim = next(p for p in list_commits(str(out)) if pq.read_table(p, columns=["id"]).column("id")[0].as_py().startswith("c"))
    left = {(r["id"], r["sample_index"]) for r in pq.read_table(victim, columns=["id", "sample_index"]).to_pylist()}
    Path(victim).unlink()
    (out / INDEX_FILE).unlink()
    manifest = open_manifest(str(m))
    f = next(f for f in manifest.files if f.path == str(new))
    skip = read_log(str(out)).complete_groups(f.identity, make_plan(manifest, str(out)).group_pairs[f.identity], f.group_starts())
    assert skip == frozenset({0, 1, 2} - {int(k[0][1:]) // 3 for k in left})
    third = run_job(spec_for(m, out), interactive=False)
    assert third["status"] == "completed" and third["this_run"]["rows"] == len(left)
    assert committed_keys(out) == want


def test_the_plan_cache_is_used_only_for_the_same_file(tmp_path):
    path = write(tmp_path / "m.parquet", rows("a", 5) + rows("a", 2), row_group_size=2)  # two duplicate ids
    out = tmp_path / "out"
    out.mkdir()
    plan = make_plan(open_manifest(str(path)), str(out))
    assert plan.expected_pairs == 5 * 2 + 2 and plan.duplicates == {5: 1, 6: 1} and len(plan.new_files) == 1
    assert [list(g) for g in plan.group_pairs.values()] == [[4, 4, 3, 1]]
    save_cache(str(out), plan)
    again = make_plan(open_manifest(str(path)), str(out))
    assert again.new_files == () and again.duplicates == plan.duplicates and again.expected_pairs == plan.expected_pairs
    write(path, rows("a", 3), row_group_size=2)  # rewritten: a new identity, read again
    changed = make_plan(open_manifest(str(path)), str(out))
    assert len(changed.new_files) == 1 and changed.expected_pairs == 6 and changed.duplicates == {}
