"""A family from a separately installed package plugs in without any change to jobs/:
it shows up in `genfleet --help`, and `make-tiny`, `demo` and `run` use it (real pip
install into a target directory, real subprocesses, real local Ray)."""

import json
import os
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "genfleet-stripes"
version = "0.1.0"

[project.entry-points."genfleet.families"]
stripes = "stripes_family:FAMILY"
"""

FAMILY = '''
"""Stripes: one CPU stage that paints `bands` horizontal stripes of the prompt's colour."""
import json
from pathlib import Path

import numpy as np
from pydantic import Field

from pipeline.family import Demo, ModelError, Params, StageSpec, TaskSpec
from pipeline.sample import Result, RowError

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class StripeParams(Params):
    bands: int = Field(default=4, ge=1, le=64)


def build(ctx):
    cfg = json.loads((Path(ctx.model_path) / "stripes.json").read_text())

    def run(samples):
        out = []
        for s in samples:
            colour = COLOURS.get((s.prompt or "").strip())
            if colour is None:
                out.append(RowError("unknown_colour", f"no colour {s.prompt!r}"))
                continue
            size = cfg["size"]
            rows = (np.arange(size) * s.params.bands // size) % 2
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[rows == 0] = colour
            out.append(Result(pixels=pixels, text=f"{s.params.bands} bands"))
        return out

    return run


class Stripes:
    name = "stripes"
    tasks = {"t2i": TaskSpec(StripeParams)}
    scores = {}

    def stages(self, model):
        return [StageSpec("paint", build, num_gpus=0, batch_size=2)]

    def check_model(self, model):
        if not (Path(model) / "stripes.json").is_file():
            raise ModelError(f"stripes model {model}: missing stripes.json")

    def model_name(self, model):
        return "stripes-v1"

    def model_fingerprint(self, model):
        return (Path(model) / "stripes.json").read_text()

    def write_tiny(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "stripes.json").write_text(json.dumps({"size": 12}))
        return str(directory)

    def demo(self):
        return Demo([{"id": "r", "prompt": "red"}, {"id": "g", "prompt": "green", "num_samples": 2}, {"id": "x", "prompt": "mauve"}],
                    ["sampler.t2i.bands=3"])


FAMILY = Stripes()
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("stripes")
    (d / "pkg").mkdir()
    (d / "pkg" / "pyproject.toml").write_text(PYPROJECT)
    (d / "pkg" / "stripes_family.py").write_text(textwrap.dedent(FAMILY))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(d / "site"), str(d / "pkg")], check=True, capture_output=True)
    return d


def genfleet(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site / "site"), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def test_an_installed_family_runs_through_help_make_tiny_demo_and_run(site, tmp_path):
    helped = genfleet(site, "--help")
    assert helped.returncode == 0 and "stripes" in helped.stdout and "bagel" in helped.stdout

    made = genfleet(site, "make-tiny", "stripes", str(tmp_path / "model"))
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads((tmp_path / "model" / "stripes.json").read_text()) == {"size": 12}

    demo = genfleet(site, "demo", "--family", "stripes", "--output", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stderr[-3000:]
    images = pq.read_table(tmp_path / "demo" / "out" / "images").to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in images) == [("g", 0), ("g", 1), ("r", 0)]
    assert {r["model"] for r in images} == {"stripes-v1"} and json.loads(images[0]["sampler"]) == {"bands": 3}
    errors = pq.read_table(tmp_path / "demo" / "out" / "errors").to_pylist()
    assert [(e["id"], e["stage"], e["kind"]) for e in errors] == [("x", "paint", "unknown_colour")]

    pq.write_table(pq.read_table(tmp_path / "demo" / "manifest.parquet"), tmp_path / "m.parquet")
    run = genfleet(site, "run", "--family", "stripes", "--model", str(tmp_path / "model"), "--manifest", str(tmp_path / "m.parquet"),
                   "--output", str(tmp_path / "out"), "--set", "sampler.t2i.bands=5")
    assert run.returncode == 0, run.stderr[-3000:]
    texts = pq.read_table(tmp_path / "out" / "texts").to_pylist()
    assert {t["text"] for t in texts} == {"5 bands"}

    missing = genfleet(site, "run", "--family", "stripes", "--model", str(tmp_path / "nowhere"), "--manifest", str(tmp_path / "m.parquet"),
                       "--output", str(tmp_path / "out2"))
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].endswith("missing stripes.json")
    assert not (tmp_path / "out2").exists()


def test_jobs_never_names_a_family():
    for path in (ROOT / "jobs").glob("*.py"):
        text = path.read_text()
        for name in ("bagel", "dalle2", "emu"):
            assert name not in text.lower(), f"{path.name} names the {name} family"
