"""The CLI contract: job-level failures exit non-zero with one line naming the cause."""

import os
import subprocess
import sys

from tests.conftest import ROOT, TOY, free_port, write_manifest


def genfleet(*args, env=None):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env)


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


def test_an_exception_inside_ray_is_a_job_failure_not_a_user_error(tmp_path):
    manifest = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "prompt": ["p"]})
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", manifest, "--output", str(tmp_path / "o"),
                 "--set", "stages.shade.num_gpus=0", "--set", "stages.shade.options.fail_build=value")
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("genfleet: job failed:") and "ValueError: toy weights are malformed" in last, p.stderr[-3000:]


def test_model_layout_problems_fail_before_anything_starts(tmp_path):
    from modeling.dalle2.tiny import write_tiny

    manifest = write_manifest(str(tmp_path / "m.parquet"), {"id": ["a"], "prompt": ["p"]})
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "llm_config.json").write_text("{}")
    p = genfleet("run", "--family", "bagel", "--model", str(tmp_path / "half"), "--manifest", manifest, "--output", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith("missing vit_config.json"), p.stderr[-2000:]
    assert "Started a local Ray" not in p.stderr and not (tmp_path / "o").exists()
    stack = write_tiny(tmp_path / "dalle2")
    p = genfleet("run", "--family", "dalle2", "--model", str(stack.parent), "--manifest", manifest, "--output", str(tmp_path / "o"))
    assert p.returncode == 2 and "is a directory; give its dalle2-laion config JSON" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_set_without_a_value_names_the_setting(tmp_path):
    p = genfleet("run", "--family", TOY, "--model", "toy", "--manifest", "m", "--output", str(tmp_path / "o"), "--set", "seed")
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and last == "genfleet: error: --set 'seed': a setting needs KEY=VALUE, e.g. --set seed=VALUE"


def test_s3_without_credentials_names_the_urls_and_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}")  # nothing to reach
    spec = tmp_path / "job.yaml"
    spec.write_text(f"family: {TOY}\nmodel: toy\nmanifest: s3://bkt/m.parquet\noutput: s3://bkt/out\n")
    for args, urls in ((["run", str(spec)], "s3://bkt/m.parquet, s3://bkt/out"), (["status", "s3://bkt/out"], "s3://bkt/out")):
        p = genfleet(*args, env=env)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert lines[0] == (f"genfleet: error: no AWS credentials to reach {urls}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or AWS_PROFILE (a profile in ~/.aws/credentials)")
