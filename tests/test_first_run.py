"""A first run that explains itself: every stage's resources checked before Ray starts,
in one message; --cpu; --dry-run starts nothing; --limit runs the first N rows with work
left and a later run completes the output; a co-located stage cannot ask for a GPU its
host lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.driver import run_job
from jobs.resources import Node, Pool, placement_problems, sharing_problems
from pipeline.resume import JOB_FILE, list_commits
from pipeline.spec import SpecError, load_spec
from tests.conftest import ROOT, TOY

# a driver in its own process that says afterwards whether it started or joined a Ray
DRIVER = ("import sys, ray, jobs.cli as cli; rc = cli.main(sys.argv[1:]); "
          "print('RAY_STARTED' if ray.is_initialized() else 'NO_RAY'); sys.exit(rc)")


def manifest(tmp_path: Path, n: int = 6, row_group_size: int = 2) -> Path:
    path = tmp_path / "m" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i}", "prompt": f"prompt {i}", "num_samples": 2} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def genfleet(*args: str, gpus_visible: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    if not gpus_visible:
        env["CUDA_VISIBLE_DEVICES"] = ""  # as on a laptop: a local Ray would declare no GPU
    return subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env, capture_output=True, text=True)


def job_args(m: Path, out: Path, *more: str) -> list[str]:
    return ["run", "--family", TOY, "--model", "toy", "--manifest", str(m), "--output", str(out),
            "--set", "outputs.rows_per_shard=4", *more]


def committed(out: Path) -> list[tuple[str, int]]:
    return sorted((r["id"], r["sample_index"]) for p in list_commits(str(out))
                  for r in pq.read_table(p, columns=["id", "sample_index"]).to_pylist())


def test_every_stage_short_of_resources_is_named_before_ray_starts(tmp_path):
    m, out = manifest(tmp_path), tmp_path / "out"
    r = genfleet(*job_args(m, out, "--set", "stages.noise.num_gpus=1"))
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("genfleet:")]
    assert len(err) == 1, r.stderr
    assert "stages.noise needs 1 GPU(s)" in err[0] and "stages.shade needs 1 GPU(s)" in err[0]
    assert "the local Ray (no CUDA device visible)" in err[0] and "--cpu" in err[0]
    assert "Traceback" not in r.stderr and r.stdout.strip().endswith("NO_RAY")
    assert not (out / JOB_FILE).exists()


def test_dry_run_checks_and_plans_without_starting_anything(tmp_path):
    m, out = manifest(tmp_path), tmp_path / "out"
    r = genfleet(*job_args(m, out, "--set", "ray.num_gpus=1", "--dry-run"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO_RAY")
    assert "every check passed" in r.stdout and "expected_pairs           12" in r.stdout
    assert "pairs_to_run             12" in r.stdout
    assert "noise" in r.stdout and "shade" in r.stdout and "every stage fits the local Ray" in r.stdout
    assert not out.exists()  # nothing written
    # a dry run fails as the run would, with the run's one line
    bad = genfleet(*job_args(m, out, "--dry-run"))
    assert bad.returncode == 2 and "stages.shade needs 1 GPU(s)" in bad.stderr and bad.stdout.strip().endswith("NO_RAY")


def test_cpu_and_limit_run_the_first_rows_then_the_same_command_completes(ray_cluster, tmp_path):
    m, out = manifest(tmp_path, n=6, row_group_size=2), tmp_path / "out"
    # no GPU anywhere, and the spec's shade wants one: --cpu runs it; --limit 3 runs rows r0..r2 only
    r = genfleet(*job_args(m, out, "--cpu", "--limit", "3"))
    assert r.returncode == 0, r.stderr
    assert "--limit 3: 6 (id, sample) pair(s) are left" in r.stdout
    assert committed(out) == [(f"r{i}", s) for i in range(3) for s in range(2)]
    job = json.loads((out / JOB_FILE).read_text())
    assert {s["device"] for s in job["fingerprint"]["stages"].values()} == {"cpu"}
    # in this process (the session's Ray): the rest, and each pair once
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": str(m), "output": str(out), "cpu": True},
                     ["outputs.rows_per_shard=4"])
    assert run_job(spec, limit=1, interactive=False)["committed"] == 8  # the next row with work left: r3
    assert run_job(spec, interactive=False)["status"] == "completed"
    assert committed(out) == [(f"r{i}", s) for i in range(6) for s in range(2)]


def test_a_colocated_stage_cannot_ask_for_a_gpu_its_host_lacks(tmp_path):
    from jobs.driver import prepare

    m = manifest(tmp_path)
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": str(m), "output": str(tmp_path / "out")},
                     ["stages.noise.num_gpus=0", "stages.shade.colocate=true", "stages.shade.device=cuda"])
    with pytest.raises(SpecError, match="stages.shade: device cuda, but it is co-located with noise, which has no GPU"):
        prepare(spec)
    # left unset, it runs on its host's device
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": str(m), "output": str(tmp_path / "out")},
                     ["stages.noise.num_gpus=0", "stages.shade.colocate=true"])
    [group] = prepare(spec).groups
    assert [(name, ctx.device) for name, ctx, _ in group.stages] == [("noise", "cpu"), ("shade", "cpu")]


def test_placement_is_per_node_not_the_cluster_sum():
    two_nodes = [Node("a", 8, 1), Node("b", 8, 1)]
    assert placement_problems([Pool("lmm", 1, 1, 2)], two_nodes) == []  # one replica on each
    [problem] = placement_problems([Pool("lmm", 2, 1, 1)], two_nodes)  # 2 GPUs in the cluster, on no one node
    assert problem.startswith("stages.lmm needs 2 GPU(s) and 1 CPU(s) per replica on one node; 1 of its 1")
    # stages that each fit, but not all at once: they run one after another (a warning, not an error)
    one_gpu = [Node("a", 8, 1)]
    assert placement_problems([Pool("prior", 1, 1, 1), Pool("decoder", 1, 1, 1)], one_gpu) == []
    assert sharing_problems([Pool("prior", 1, 1, 1), Pool("decoder", 1, 1, 1)], one_gpu) == ["stages.decoder (1 replica(s))"]
    # the largest first: a 1-GPU pool does not take the node a 2-GPU pool needs
    assert sharing_problems([Pool("vae", 1, 1, 1), Pool("lmm", 2, 1, 1)], [Node("a", 8, 1), Node("b", 8, 2)]) == []
    assert sharing_problems([Pool("prep", 0, 4, 2)], [Node("a", 8, 0)]) == [
        "reading and encoding (the actors take every CPU; they need 1 more)"]


def test_an_output_refuses_another_manifest_but_not_the_same_files_moved(ray_cluster, tmp_path):
    import shutil

    from pipeline.resume import ResumeError

    a, out = manifest(tmp_path / "a", n=4), tmp_path / "out"

    def spec(m):
        return load_spec(None, {"family": TOY, "model": "toy", "manifest": str(m.parent), "output": str(out)},
                         ["stages.shade.device=cpu", "outputs.rows_per_shard=4"])

    assert run_job(spec(a), interactive=False)["status"] == "completed"
    other = tmp_path / "b" / "m" / "part-0.parquet"
    other.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": f"x{i}", "prompt": "other"} for i in range(10)]), other)
    with pytest.raises(ResumeError, match=r"made from another manifest \(.*/a/m, none of whose 1 file\(s\) is in .*/b/m\)"):
        run_job(spec(other), interactive=False)
    # the same files under another root (copied with their times): the same job, nothing left to do
    moved = tmp_path / "c" / "m" / "part-0.parquet"
    moved.parent.mkdir(parents=True)
    shutil.copy2(a, moved)
    os.environ["RAY_ADDRESS"] = "127.0.0.1:9"  # a dead port: nothing-to-do must not need Ray
    try:
        assert run_job(spec(moved), interactive=False)["committed"] == 8
    finally:
        del os.environ["RAY_ADDRESS"]


def test_a_start_that_fails_loading_a_model_leaves_no_job_behind(ray_cluster, tmp_path):
    from pipeline.resume import SUMMARY_FILE

    m, out = manifest(tmp_path, n=2), tmp_path / "out"
    # in a Ray of its own: the failed job's cancelled tasks would leave this session's workers half-way through imports
    r = genfleet(*job_args(m, out, "--cpu", "--set", "stages.shade.options.fail_build=1"))
    assert r.returncode == 1 and "toy weights are missing" in r.stderr, r.stderr
    assert not (out / JOB_FILE).exists() and not (out / SUMMARY_FILE).exists()
    # so the corrected command (other settings) is not refused as another job: no --new-run
    spec = load_spec(None, {"family": TOY, "model": "toy", "manifest": str(m), "output": str(out), "cpu": True},
                     ["outputs.rows_per_shard=4"])
    assert run_job(spec, interactive=False)["status"] == "completed"
    assert committed(out) == [(f"r{i}", s) for i in range(2) for s in range(2)]
