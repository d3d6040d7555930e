"""Column mapping (`manifest.columns`: the runner's name -> the manifest's column) and the stop
before the first commit when every one of the manifest's first rows fails validation alike."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.driver import prepare, run_job
from pipeline.manifest import ManifestError, open_manifest, read_file_rows
from pipeline.plan import PLAN_DIR, make_plan, save_cache
from pipeline.resume import ResumeError
from pipeline.spec import load_spec
from pipeline.validate import FIRST_ROWS
from tests.conftest import ROOT, TOY, write_manifest

SETS = ["stages.shade.device=cpu", "outputs.rows_per_shard=4"]
CAPTION = ["--set", "manifest.columns.prompt=caption"]


def captions(n: int) -> list[dict]:
    return [{"id": f"c{i}", "caption": f"a caption {i}", "source": f"src{i}"} for i in range(n)]


def spec_for(manifest, output, *sets):
    return load_spec(None, {"family": TOY, "model": "toy", "manifest": str(manifest), "output": str(output)}, [*SETS, *sets])


def cli(manifest, output, *args) -> subprocess.CompletedProcess:
    """`genfleet run` in its own process, with RAY_ADDRESS at a port nothing listens on: a run
    that got as far as starting or joining Ray would fail with a Ray error, not the check's."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    sets = [a for s in SETS for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--family", TOY, "--model", "toy", "--manifest", str(manifest),
                           "--output", str(output), *sets, *args], capture_output=True, text=True, env=env, cwd=ROOT)


# --- the mapping -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned(ray_cluster, tmp_path_factory):
    """One job over a manifest whose prompts are in `caption`, mapped: 3 captioned rows among
    1,000 with empty captions (inside the first 1,000: the start-up check sees them)."""
    d = tmp_path_factory.mktemp("captioned")
    rows = [{"id": f"r{i:04d}", "caption": "", "source": f"src{i}"} for i in range(1003)]
    for i in (10, 500, 990):
        rows[i]["caption"] = f"a caption {i}"
    manifest = write_manifest(str(d / "m.parquet"), rows)
    out = d / "out"
    result = run_job(spec_for(manifest, out, "manifest.columns.prompt=caption", "errors.max_rate=1", "outputs.rows_per_shard=200"),
                     interactive=False)
    return result, rows, manifest, out


def test_a_caption_manifest_runs_with_its_captions_as_prompts(captioned):
    result, rows, manifest, out = captioned
    images = pq.read_table(out / "images").to_pylist()
    assert {r["id"]: r["prompt"] for r in images} == {r["id"]: r["caption"] for r in rows if r["caption"]}
    # the mapped column is the prompt, not carried a second time; the others keep their names
    assert "caption" not in images[0]
    assert {r["id"]: r["source"] for r in images} == {r["id"]: r["source"] for r in rows if r["caption"]}
    assert json.loads((out / "_job.json").read_text())["manifest"] == manifest
    # another mapping makes other outputs of the same rows: not resumed into the same OUTPUT
    with pytest.raises(ResumeError, match="manifest_columns.prompt: 'caption' -> 'source'"):
        prepare(spec_for(manifest, out, "manifest.columns.prompt=source"))


def test_three_valid_rows_among_a_thousand_bad_ones_run(captioned):
    result, rows, _, out = captioned
    assert result["status"] == "completed" and result["committed"] == result["expected"] == 1003
    assert result["errors_by_kind"] == {"empty_prompt": 1000}
    assert pq.read_table(out / "errors", columns=["id"]).num_rows == 1000


def test_without_the_mapping_the_job_stops_before_ray_with_one_line(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), captions(5))
    out = tmp_path / "out"
    done = cli(manifest, out)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"genfleet: error: manifest {manifest}: all 5 rows fail validation as empty_prompt (id 'c0': prompt is empty)")
    assert "its columns: id, caption, source" in line and "--set manifest.columns.prompt=<column>" in line
    assert not (out / "_job.json").exists() and not (out.exists() and any(out.iterdir()))  # nothing written


def test_mapping_errors_stop_the_cli_with_their_message(tmp_path, capsys):
    manifest = write_manifest(str(tmp_path / "m.parquet"), captions(2))
    args = ["run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "out"),
            "--set", "manifest.columns.prompt=text"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"genfleet: error: manifest file {manifest}: column 'text' (manifest.columns.prompt) is missing "
                          "(columns: id, caption, source); set manifest.columns.prompt to one of them") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("files, columns, message", [
    ({"a": {"id": ["x"], "caption": ["c"]}}, {"caption": "prompt"},
     "manifest.columns.caption: not a column genfleet reads; map one of: id, task, prompt"),
    ({"a": {"id": ["x"], "caption": ["c"]}}, {"caption": "prompt"},
     ", image; the other way round: manifest.columns.prompt=caption"),
    ({"a": {"id": ["x"], "caption": ["c"]}}, {"prompt": "caption", "negative_prompt": "caption"},
     "manifest.columns.prompt, manifest.columns.negative_prompt: all name column 'caption'"),
    ({"a": {"id": ["x"], "caption": ["c"]}, "b": {"id": ["y"], "text": ["c"]}}, {"prompt": "caption"},
     "b.parquet: column 'caption' (manifest.columns.prompt) is missing (columns: id, text); set manifest.columns.prompt"),
    ({"a": {"id": ["x"], "caption": ["c"], "prompt": ["p"]}}, {"prompt": "caption"},
     "a.parquet: has both a 'prompt' column and 'caption' (manifest.columns.prompt): which one is the prompt is ambiguous"),
    ({"a": {"id": ["x"], "caption": [3]}}, {"prompt": "caption"},
     "a.parquet: column 'caption' (manifest.columns.prompt) has type int64, expected string"),
    ({"a": {"key": ["x"], "caption": ["c"]}}, {"prompt": "caption"},
     "a.parquet: required column 'id' is missing (columns: key, caption); if the ids are in another column, map it: "
     "--set manifest.columns.id=<column>"),
])
def test_each_mapping_error_names_the_setting_and_the_column(tmp_path, files, columns, message):
    for name, data in files.items():
        write_manifest(str(tmp_path / "m" / f"{name}.parquet"), data)
    with pytest.raises(ManifestError) as e:
        open_manifest(str(tmp_path / "m"), {"image": False}, columns)
    assert message in str(e.value)


def test_every_reader_sees_the_runners_names(tmp_path):
    path = write_manifest(str(tmp_path / "m.parquet"), {"key": ["a", "b", "a"], "caption": ["p", "q", "r"], "n": [2, 1, 3],
                                                       "negative_prompt": ["not this", "nor this", "nor"]}, row_group_size=2)
    # a swap: the manifest's negative_prompt column is the prompt, its caption the negative prompt
    mapping = {"id": "key", "prompt": "negative_prompt", "negative_prompt": "caption", "num_samples": "n"}
    m = open_manifest(path, None, mapping)
    assert m.schema.names == ["id", "negative_prompt", "num_samples", "prompt"] and m.extra_columns == []
    rows = [r for f in m.files for t in read_file_rows(m.url_of(f), f, mapping=m.columns) for r in t.to_pylist()]
    assert [(r["id"], r["prompt"], r["negative_prompt"], r["num_samples"]) for r in rows] == [
        ("a", "not this", "p", 2), ("b", "nor this", "q", 1), ("a", "nor", "r", 3)]
    head = m.first_rows(FIRST_ROWS)  # no more than the first row group
    assert head.to_pylist() == rows[:2]
    plan = make_plan(m)
    assert plan.duplicates == {2: 1} and plan.expected_pairs == 2 + 1 + 1  # ids and counts from key and n


def test_the_plan_cache_of_one_id_column_is_not_another_s(tmp_path):
    path = write_manifest(str(tmp_path / "m.parquet"), {"name": ["a", "b"], "key": ["x", "x"], "prompt": ["p", "q"]})
    out = str(tmp_path / "out")
    by_name = make_plan(open_manifest(path, None, {"id": "name"}), out)
    save_cache(out, by_name)
    by_key = make_plan(open_manifest(path, None, {"id": "key"}), out)
    assert not by_name.duplicates and by_key.duplicates == {1: 1} and len(by_key.new_files) == 1  # read, not the cached plan
    save_cache(out, by_key)
    assert len(list((tmp_path / "out" / PLAN_DIR).iterdir())) == 2
    assert make_plan(open_manifest(path, None, {"id": "key"}), out).new_files == ()  # its own cache from now on


# --- the same-kind stop ------------------------------------------------------------------------


def test_rows_that_fail_in_more_than_one_way_let_the_job_run(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "" if i % 2 else "p", "seed": -1} for i in range(6)]  # bad_seed and empty_prompt
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    assert prepare(spec_for(manifest, tmp_path / "out")).plan.num_rows == 6


def test_every_row_missing_an_input_says_which_column_to_map(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": f"e{i}", "task": "edit", "prompt": "p", "picture": b"x"} for i in range(3)])
    with pytest.raises(ManifestError) as e:
        prepare(spec_for(manifest, tmp_path / "out"))
    assert "all 3 rows fail validation as missing_input (id 'e0': task 'edit' needs 'image')" in str(e.value)
    assert str(e.value).endswith("its columns: id, task, prompt, picture; if the image values are in another column, map it: "
                                 "--set manifest.columns.image=<column>")


def test_the_check_reads_only_the_first_rows(tmp_path):
    rows = [{"id": f"r{i:04d}", "prompt": "", "seed": 1} for i in range(FIRST_ROWS)] + [{"id": "late", "prompt": "valid", "seed": 1}]
    path = tmp_path / "m.parquet"
    write_manifest(str(path), rows, row_group_size=FIRST_ROWS)
    # the second row group's prompt page is garbage: reading it fails (the plan reads only the ids)
    start = pq.ParquetFile(path).metadata.row_group(1).column(1).data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start: start + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    m = open_manifest(str(path))
    with pytest.raises(ManifestError, match="row group 1 is unreadable"):
        list(read_file_rows(m.url_of(m.files[0]), m.files[0]))
    with pytest.raises(ManifestError) as e:
        prepare(spec_for(path, tmp_path / "out"))
    assert f"all of its first {FIRST_ROWS} rows fail validation as empty_prompt (id 'r0000': prompt is empty)" in str(e.value)
    assert "its columns: id, prompt, seed;" in str(e.value)
