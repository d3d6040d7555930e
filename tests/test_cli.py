"""The CLI contract: job-level failures exit non-zero with one line naming the cause."""

import subprocess
import sys

from tests.conftest import ROOT, TOY, write_manifest


def genfleet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_bad_manifest_fails_fast_naming_file_and_column(tmp_path):
    manifest = write_manifest(str(tmp_path / "bad.parquet"), {"id": ["a"], "seed": ["not a number"]})
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"))
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert "bad.parquet" in line and "'seed'" in line
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


def test_invalid_spec_and_unknown_stage(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f"family: {TOY}\nmodel: toy\nmanifest: m\noutput: o\nstages:\n  shade:\n    replicas: 0\n")
    p = genfleet("run", str(spec))
    assert p.returncode == 2 and "stages.shade.replicas" in p.stderr
    manifest = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "prompt": ["p"]})
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"),
                 "--set", "stages.nosuch.batch_size=2")
    assert p.returncode == 2 and "nosuch" in p.stderr and "noise, shade" in p.stderr
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"),
                 "--set", "sampler.t2i.steps=3")
    assert p.returncode == 2 and "sampler.t2i" in p.stderr and "steps" in p.stderr


def test_status_of_nothing():
    p = genfleet("status", "/nonexistent/output")
    assert p.returncode == 2 and "no genfleet job" in p.stderr


def test_a_stage_that_cannot_load_fails_the_job_with_its_cause(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "prompt": ["p"]})
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"),
                 "--set", "stages.shade.num_gpus=0", "--set", "stages.shade.options.fail_build=true")
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("genfleet: job failed:") and "RuntimeError: toy weights are missing" in last, p.stderr[-3000:]
