"""Job specs: the shipped examples validate; bad specs say which field is wrong."""

from pathlib import Path

import pytest

from pipeline.spec import SpecError, load_spec

# the job specs among the examples (configs/ also holds a Kubernetes manifest: kuberay-rayjob.yaml)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if "apiVersion:" not in p.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_specs_validate(path):
    spec = load_spec(str(path))
    assert spec.family in ("bagel", "dalle2", "emu1", "emu2") and spec.stages


def test_flags_override_yaml_and_set_parses_yaml_values(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("family: bagel\nmodel: m\nmanifest: a\noutput: b\nseed: 3\n")
    spec = load_spec(str(f), {"output": "c"}, ["stages.lmm.replicas=[1, 4]", "stages.lmm.num_gpus=0.5", "seed=9"])
    assert spec.output == "c" and spec.seed == 9
    assert spec.stage("lmm").replicas == (1, 4) and spec.stage("lmm").num_gpus == 0.5


@pytest.mark.parametrize("sets, field", [
    (["stages.lmm.num_gpus=1.5"], "stages.lmm.num_gpus"),
    (["stages.lmm.replicas=[3, 1]"], "stages.lmm.replicas"),
    (["outputs.image_format=gif"], "outputs.image_format"),
    (["seed=-1"], "seed"),
    (["nonsense=1"], "nonsense"),
    (["manifest.path=\" \""], "manifest must not be empty"),
    (["manifest.columns.prompt=[a]"], "manifest.columns.prompt"),
    (["manifest.colums.prompt=a"], "manifest.colums"),
])
def test_bad_values_name_the_field(sets, field):
    with pytest.raises(SpecError) as e:
        load_spec(None, {"family": "bagel", "model": "m", "manifest": "a", "output": "b"}, sets)
    assert field in str(e.value)


def test_missing_required_fields():
    with pytest.raises(SpecError, match="manifest"):
        load_spec(None, {"family": "bagel", "model": "m", "output": "b"})


def test_manifest_is_a_path_or_a_path_with_a_column_mapping(tmp_path):
    plain, mapped = tmp_path / "plain.yaml", tmp_path / "mapped.yaml"
    plain.write_text("family: bagel\nmodel: m\nmanifest: s3://b/m/\noutput: o\n")
    mapped.write_text("family: bagel\nmodel: m\nmanifest: {path: s3://b/m/, columns: {prompt: caption}}\noutput: o\n")
    assert load_spec(str(plain)).manifest.model_dump() == {"path": "s3://b/m/", "columns": {}}
    assert load_spec(str(mapped)).manifest.model_dump() == {"path": "s3://b/m/", "columns": {"prompt": "caption"}}
    # --manifest sets the path (and keeps the spec's mapping); --set adds to the mapping
    flags = load_spec(str(mapped), {"manifest": "other.parquet"}, ["manifest.columns.negative_prompt=neg"])
    assert flags.manifest.model_dump() == {"path": "other.parquet", "columns": {"prompt": "caption", "negative_prompt": "neg"}}
    cli = load_spec(None, {"family": "bagel", "model": "m", "manifest": "x", "output": "o"}, ["manifest.columns.prompt=caption"])
    assert cli.manifest.model_dump() == {"path": "x", "columns": {"prompt": "caption"}}
    # what `submit` ships: the resolved spec, read back the same
    assert load_spec(None, cli.model_dump(mode="json", by_alias=True)) == cli
