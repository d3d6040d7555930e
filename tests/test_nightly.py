"""Nightly synthesis over a manifest prefix that grows, on one OUTPUT, over three 'days' (toy
family, the session's local Ray): day 1 makes file A's rows; day 2 adds file B and makes only
B's (A's shard files keep their bytes); day 3 adds nothing and ends without starting Ray. Each
run leaves its record in OUTPUT/_runs/, which `genfleet status` and the report show. Plus the
shipped nightly examples (the job spec and the KubeRay RayJob that runs it) and `{date}` in
the output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from jobs.driver import run_job
from pipeline.resume import RUNS_DIR
from pipeline.runs import list_runs, read_runs
from pipeline.spec import SpecError, load_spec
from tests.conftest import ROOT, TOY, write_manifest

DAYS = {"2026-12-01/part-0.parquet": [{"id": f"a{i}", "prompt": f"day one {i}", "num_samples": 2} for i in range(5)],
        "2026-12-02/part-0.parquet": [{"id": f"b{i}", "prompt": f"day two {i}", "num_samples": 2} for i in range(3)]
        + [{"id": "b3", "prompt": "day two 3", "num_samples": 3}]}
FILE_A, FILE_B = DAYS
SHARD_DIRS = ("images", "embeddings", "texts", "errors", "_commits")


def pairs(rows: list[dict]) -> int:
    return sum(r["num_samples"] for r in rows)


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for d in SHARD_DIRS if (out / d).exists() for p in sorted((out / d).iterdir())}


def ids_in(path: Path) -> set[str]:
    return set(pq.read_table(path, columns=["id"]).column("id").to_pylist())


def nightly_spec(tmp: Path, manifest: Path, out: Path) -> Path:
    """The shape of configs/nightly.yaml for the toy family: a manifest prefix, one OUTPUT."""
    spec = tmp / "nightly.yaml"
    spec.write_text(yaml.safe_dump({"family": TOY, "model": "toy", "manifest": f"{manifest}/", "output": str(out),
                                    "stages": {"shade": {"device": "cpu"}}, "outputs": {"rows_per_shard": 4}}))
    return spec


def runs_table(html: str) -> list[list[str]]:
    """The words of each row of the report's runs table."""
    runs = html[html.index('<div id="runs">'):]
    return [re.sub(r"<[^>]+>", " ", r).split() for r in re.findall(r"<tr>(.*?)</tr>", runs[:runs.index("</table>")])][1:]


def status_json(out: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def nights(ray_cluster, tmp_path_factory):
    """The three nights, run as cron would: the same command on the same spec."""
    tmp = tmp_path_factory.mktemp("nightly")
    manifest, out = tmp / "manifests", tmp / "out"
    spec = nightly_spec(tmp, manifest, out)
    write_manifest(str(manifest / FILE_A), DAYS[FILE_A])
    assert main(["run", str(spec)]) == 0  # day 1, in this process on the session's Ray
    after_day1 = shard_files(out)
    write_manifest(str(manifest / FILE_B), DAYS[FILE_B])
    assert main(["run", str(spec)]) == 0  # day 2
    after_day2 = shard_files(out)
    # day 3, nothing new: RAY_ADDRESS points at a port nothing listens on, so starting or joining Ray would fail the run
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    day3 = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec)], capture_output=True, text=True, env=env, cwd=ROOT)
    return {"tmp": tmp, "manifest": manifest, "out": out, "spec": spec, "day1": after_day1, "day2": after_day2, "day3": day3}


def test_day_two_makes_only_the_new_file_and_day_three_nothing(nights):
    out, day1, day2 = nights["out"], nights["day1"], nights["day2"]
    assert day1 and all(day2.get(name) == data for name, data in day1.items()), "day 1's shard files keep their bytes"
    new = [name for name in day2 if name not in day1 and not name.startswith("_commits")]
    assert new and all(ids_in(out / name) <= {r["id"] for r in DAYS[FILE_B]} for name in new)
    made = {(r["id"], r["sample_index"]) for p in (out / "images").iterdir() for r in pq.read_table(p, columns=["id", "sample_index"]).to_pylist()}
    assert made == {(r["id"], s) for rows in DAYS.values() for r in rows for s in range(r["num_samples"])}

    day3 = nights["day3"]
    assert day3.returncode == 0, day3.stderr[-3000:]
    assert shard_files(out) == day2
    assert json.loads((out / "_summary.json").read_text())["this_run"]["rows"] == 0


def test_each_night_appends_a_run_record(nights):
    out = nights["out"]
    names = list_runs(str(out))
    assert len(names) == 3 and sorted(p.name for p in (out / RUNS_DIR).iterdir()) == [f"{n}.json" for n in names]
    runs = read_runs(str(out), names)
    assert [r.started_at for r in runs] == sorted(r.started_at for r in runs) and runs[0].started_at < runs[2].started_at
    assert [r.status for r in runs] == ["completed"] * 3
    assert [r.new_manifest_files for r in runs] == [(FILE_A,), (FILE_B,), ()]
    assert [r.manifest_files for r in runs] == [1, 2, 2]
    a, b = pairs(DAYS[FILE_A]), pairs(DAYS[FILE_B])
    assert [r.counts.committed for r in runs] == [a, b, 0] and [r.counts.committed_before for r in runs] == [0, a, a + b]
    assert [r.counts.expected for r in runs] == [a, a + b, a + b] and [r.counts.images for r in runs] == [a, b, 0]
    assert all(r.ended_at is not None and r.started_at <= r.ended_at for r in runs)
    assert runs[0].pid == runs[1].pid == os.getpid() != runs[2].pid  # days 1 and 2 ran here, day 3 in its own process
    record = json.loads((out / RUNS_DIR / f"{names[1]}.json").read_text())
    started, ended = (datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
    assert started.utcoffset().total_seconds() == 0 and started <= ended
    assert record["manifest"] == f"{nights['manifest']}/" and record["manifest_files"] == {"seen": 2, "new": [FILE_B]}
    assert record["genfleet_version"] and record["host"] and record["rows_per_second"] > 0


def test_status_and_the_report_show_the_history(nights, capsys):
    out = nights["out"]
    st = status_json(out, capsys)
    assert st["runs"] == 3 and [h["status"] for h in st["history"]] == ["completed"] * 3
    assert [h["new_pairs"] for h in st["history"]] == [pairs(DAYS[FILE_A]), pairs(DAYS[FILE_B]), 0]
    assert [h["new_manifest_files"] for h in st["history"]] == [[FILE_A], [FILE_B], []]
    assert main(["status", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table[table.index("  history"):].splitlines()
    assert lines[1].split() == ["started_at", "wall_seconds", "new_pairs", "status", "new_manifest_files"]
    assert len(lines) == 5 and lines[3].split()[-1] == FILE_B and lines[4].split()[-2:] == ["completed", "-"]

    rows = runs_table((out / "report.html").read_text())  # written by day 3's run
    assert [r[0] for r in rows] == ["1", "2", "3"] and all("completed" in r for r in rows)
    assert FILE_A in rows[0] and FILE_B in rows[1] and "none" in rows[2]


def test_an_output_of_an_older_version_reads_its_runs_from_job_json(nights, capsys):
    old = nights["tmp"] / "old"
    shutil.copytree(nights["out"], old)
    shutil.rmtree(old / RUNS_DIR)  # before _runs/: only _job.json's runs (the two that started; a no-op run was not recorded)
    st = status_json(old, capsys)
    assert st["runs"] == 2 and [h["status"] for h in st["history"]] == ["-", "completed"]
    assert [h["new_manifest_files"] for h in st["history"]] == [None, None]
    assert main(["report", str(old)]) == 0
    assert [r[0] for r in runs_table((old / "report.html").read_text())] == ["1", "2"]


def test_a_new_run_starts_the_history_over(nights):
    again = nights["tmp"] / "again"
    shutil.copytree(nights["out"], again)
    spec = load_spec(str(nights["spec"]), {"output": str(again)})
    assert run_job(spec, new_run=True, interactive=False)["status"] == "completed"
    (run,) = read_runs(str(again), list_runs(str(again)))
    assert run.new_manifest_files == (FILE_A, FILE_B) and run.counts.committed_before == 0
    assert run.counts.committed == pairs(DAYS[FILE_A]) + pairs(DAYS[FILE_B])


def test_the_nightly_examples_validate():
    spec = load_spec(str(ROOT / "configs" / "nightly.yaml"))
    assert spec.manifest.path.endswith("/") and "{" not in spec.output
    job = yaml.safe_load((ROOT / "configs" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0 for c in workers)
    command = re.search(r"python -m jobs\.cli run (\S+)", job["spec"]["entrypoint"])
    assert command is not None
    config = ROOT / command.group(1)
    assert config.exists() and load_spec(str(config)).family == spec.family


def test_date_in_the_output_is_todays_utc_date(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(f"family: {TOY}\nmodel: toy\nmanifest: m\noutput: {tmp_path}/synth/{{date}}/\n")
    before = datetime.now(UTC).date().isoformat()
    spec = load_spec(str(f))
    after = datetime.now(UTC).date().isoformat()
    assert spec.output in {f"{tmp_path}/synth/{d}/" for d in (before, after)}
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", spec.output.rstrip("/").rsplit("/", 1)[-1])

    with pytest.raises(SpecError, match=r"output: \{day\}"):
        load_spec(str(f), {"output": f"{tmp_path}/synth/{{day}}"})
    bad = tmp_path / "out-{run}"
    assert main(["run", "--family", TOY, "--model", "toy", "--manifest", "m", "--output", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "output" in err and "{run}" in err and "{date}" in err
    assert not bad.exists()
