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
])
def test_bad_values_name_the_field(sets, field):
    with pytest.raises(SpecError) as e:
        load_spec(None, {"family": "bagel", "model": "m", "manifest": "a", "output": "b"}, sets)
    assert field in str(e.value)


def test_missing_required_fields():
    with pytest.raises(SpecError, match="manifest"):
        load_spec(None, {"family": "bagel", "model": "m", "output": "b"})
