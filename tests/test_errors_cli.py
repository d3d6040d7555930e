"""`genfleet errors OUTPUT [--kind K]` on an output in S3 (moto): shards written by the real sink,
the run recorded as a run records it, then the CLI's main function reads them back."""

import json

import pytest

from jobs.cli import main
from pipeline.resume import begin_run, read_log, retire_errors
from pipeline.rows import to_block
from pipeline.sink import SinkConfig, write_shard
from tests.test_sink import encoded, failed, sample


@pytest.fixture
def output(bucket):
    out = f"{bucket}/out"
    cfg = SinkConfig(output=out, family="f", model="m")
    begin_run(out, {"f": 1}, manifest="m", expected_pairs=10, new_run=False, retry_errors=False, log=read_log(out))
    write_shard(to_block(encoded([sample(0), sample(1)]) + [failed("e1", "empty_prompt"), failed("e2", "empty_prompt")]), cfg)
    write_shard(to_block(encoded([sample(2)]) + [failed("e3", "empty_prompt"), failed("r1", "rejected", sample_index=0)]), cfg)
    write_shard(to_block([failed("t1", "throttled", retryable=True)]), cfg)  # transient: not an error
    return out


def test_errors_lists_each_kind_with_counts_and_examples(output, capsys):
    assert main(["errors", output, "--examples", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"genfleet errors of {output}: 4 permanent error(s) in 2 kind(s)"
    assert lines[1] == "  empty_prompt: 3" and lines[4] == "  rejected: 1"  # the most frequent first
    assert len(lines) == 6 and all(line.startswith("    e") and line.endswith("validate: prompt is empty") for line in lines[2:4])
    assert lines[5] == "    r1 [0] validate: prompt is empty"


def test_errors_of_one_kind_and_as_json(output, capsys):
    assert main(["errors", output, "--kind", "empty_prompt", "--json"]) == 0
    [kind] = json.loads(capsys.readouterr().out)
    assert kind["kind"] == "empty_prompt" and kind["count"] == 3
    assert sorted(e["id"] for e in kind["examples"]) == ["e1", "e2", "e3"] and kind["examples"][0]["stage"] == "validate"
    assert main(["errors", output, "--kind", "nosuch"]) == 0
    out = capsys.readouterr().out
    assert ": 0 permanent error(s)" in out and "no errors of kind nosuch" in out


def test_retired_errors_are_not_listed(output, capsys):
    retire_errors(output, read_log(output).commits)  # what --retry-errors does when its run starts
    assert main(["errors", output]) == 0
    assert capsys.readouterr().out.splitlines() == [f"genfleet errors of {output}: 0 permanent error(s)"]


def test_errors_of_no_job(bucket, capsys):
    assert main(["errors", f"{bucket}/nothing"]) == 2
    assert "no genfleet job" in capsys.readouterr().err
