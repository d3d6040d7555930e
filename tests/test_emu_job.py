"""Emu1 and Emu2-Gen through the real runner on CPU (tiny random models): t2i and compose rows
with bad rows mixed in; a driver killed with SIGKILL after its first commit, then resumed,
gives the bytes of an uninterrupted run; `genfleet demo` and `make-tiny` through the CLI."""

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from modeling.emu.tiny import write_tiny
from pipeline.demo_images import demo_png
from pipeline.resume import list_commits
from pipeline.spec import load_spec
from tests.conftest import ROOT, write_manifest
from tests.reliability.procs import kill_driver, wait_for_commits
from tests.test_job_s3 import read

FAMILIES = {"emu2": "pipeline.families.emu:EMU2", "emu1": "pipeline.families.emu:EMU1"}
STAGES = ("prepare", "lmm", "unet", "vae_decode")
SMALL = [f"sampler.{task}.{k}={v}" for task in ("t2i", "compose") for k, v in (("num_inference_steps", 2), ("default_size", "[64,64]"))]
ON_CPU = [f"stages.{s}.num_gpus=0" for s in STAGES]
# batches of one: a sample's float work is then the same in every run, whichever samples a
# resumed run has left (other batch shapes round differently: pixels within one level)
ONE_BY_ONE = [f"stages.{s}.batch_size=1" for s in ("lmm", "unet", "vae_decode")]
N_EMBEDS = {"emu2": [64, 32], "emu1": [32, 64]}


def rows(variant):
    out = [
        {"id": "t2i-a", "task": "t2i", "prompt": "a red cube on a table", "num_samples": 2, "images": None},
        {"id": "t2i-b", "task": "t2i", "prompt": "a lighthouse at dusk", "num_samples": 1, "images": None,
         "params": '{"guidance_scale": 1.0}', "width": 128},
        {"id": "compose-a", "task": "compose", "prompt": "<image> as a watercolor", "num_samples": 1, "images": [demo_png(1)]},
        {"id": "compose-b", "task": "compose", "prompt": "in the style of these", "num_samples": 1,
         "images": [demo_png(2), demo_png(3, size=48)]},
        {"id": "bad-count", "task": "compose", "prompt": "<image> and <image>", "num_samples": 1, "images": [demo_png(4)]},
        {"id": "bad-empty", "task": "t2i", "prompt": "  ", "num_samples": 1, "images": None},
    ]
    if variant == "emu2":
        out.append({"id": "autoencode", "task": "compose", "prompt": "", "num_samples": 1, "images": [demo_png(5)]})
    for r in out:
        r.setdefault("params", None)
        r.setdefault("width", None)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("emu_models")
    return {v: str(write_tiny(d / v, v)) for v in FAMILIES}


def _spec(variant, model, manifest, output, *sets):
    return load_spec(None, {"family": FAMILIES[variant], "model": model, "manifest": manifest, "output": output},
                     [*ON_CPU, *SMALL, "outputs.rows_per_shard=3", *sets])


def start_driver(variant, model, manifest, output, sets):
    """`genfleet run` in its own process group (it starts its own local Ray), as tests/reliability/procs.py does."""
    cmd = [sys.executable, "-m", "jobs.cli", "run", "--family", FAMILIES[variant], "--model", model, "--manifest", manifest,
           "--output", output, *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _images(output):
    t = read(output, "images")
    return dict(zip(zip(t["id"].to_pylist(), t["sample_index"].to_pylist()), [i["bytes"] for i in t["image"].to_pylist()]))


# one actor for all the stages: each actor costs seconds of start-up on a small CPU box
# (the demo below runs them on an actor pool each)
TOGETHER = [f"stages.{s}.colocate=true" for s in STAGES[1:]]


def check_outputs(output, variant, copies):
    """The outputs of rows(variant) repeated `copies` times (ids suffixed -0, -1, ...)."""
    good = {("t2i-a", 0), ("t2i-a", 1), ("t2i-b", 0), ("compose-a", 0), ("compose-b", 0)} | (
        {("autoencode", 0)} if variant == "emu2" else set())
    good = {(f"{i}-{c}", k) for i, k in good for c in range(copies)}
    images = _images(output)
    assert set(images) == good
    for (row_id, _), data in images.items():
        img = np.asarray(Image.open(io.BytesIO(data)))
        assert img.shape == ((64, 128, 3) if row_id.startswith("t2i-b") else (64, 64, 3)) and img.std() > 0, row_id
    assert images[("t2i-a-0", 0)] != images[("t2i-a-0", 1)]
    meta = read(output, "images").to_pylist()
    assert {r["family"] for r in meta} == {variant} and {r["nsfw"] for r in meta} == {None}  # safety checker off
    emb = {(r["id"], r["sample_index"]): r for r in read(output, "embeddings").to_pylist()}
    assert set(emb) == good
    for r in emb.values():
        assert r["emu_visual_shape"] == N_EMBEDS[variant] and len(r["emu_visual"]) == np.prod(N_EMBEDS[variant])
    assert emb[("t2i-a-0", 0)]["emu_visual"] == emb[("t2i-a-0", 1)]["emu_visual"]  # one LLM pass per row
    errors = sorted((r["id"], r["stage"], r["kind"]) for r in read(output, "errors").to_pylist())
    assert errors == sorted(x for c in range(copies) for x in [
        (f"bad-count-{c}", "prepare", "bad_prompt"), (f"bad-empty-{c}", "validate", "empty_prompt")])
    return images


def manifest_of(tmp_path, variant, copies):
    return write_manifest(str(tmp_path / "m.parquet"), [{**r, "id": f"{r['id']}-{c}"} for c in range(copies) for r in rows(variant)])


def test_emu2_t2i_and_compose_through_the_runner(ray_cluster, models, tmp_path):
    output = str(tmp_path / "out")
    result = run_job(_spec("emu2", models["emu2"], manifest_of(tmp_path, "emu2", 1), output, *TOGETHER), interactive=False)
    assert result["status"] == "completed" and result["images"] == 6 and result["errors"] == 2, result
    check_outputs(output, "emu2", 1)


def test_emu1_sigkill_after_the_first_commit_then_resume_gives_the_same_bytes(ray_cluster, models, tmp_path):
    copies = 3  # enough work left after the first commit to kill the driver in
    manifest, model = manifest_of(tmp_path, "emu1", copies), models["emu1"]
    sets = [*TOGETHER, *ONE_BY_ONE, "outputs.rows_per_shard=2"]
    reference = str(tmp_path / "reference")
    result = run_job(_spec("emu1", model, manifest, reference, *sets), interactive=False)
    assert result["status"] == "completed" and result["images"] == 5 * copies and result["errors"] == 2 * copies, result
    want = check_outputs(reference, "emu1", copies)

    output = str(tmp_path / "crashy")
    proc = start_driver("emu1", model, manifest, output, [*ON_CPU, *SMALL, *sets, "ray.num_cpus=4"])
    assert wait_for_commits(output, 1, proc), proc.stdout.read()[-3000:]
    assert proc.poll() is None, "the driver finished before it could be killed"
    kill_driver(proc)
    committed = sum(len(pq.read_table(p, columns=["id"])) for p in list_commits(output))
    assert committed >= 1

    resumed = run_job(_spec("emu1", model, manifest, output, *sets), interactive=False)
    assert resumed["status"] == "completed" and resumed["this_run"]["rows"] == 7 * copies - committed, resumed
    got = read(output, "images")
    keys = list(zip(got["id"].to_pylist(), got["sample_index"].to_pylist()))
    assert len(keys) == len(set(keys)), "a pair was written twice"
    assert dict(zip(keys, [i["bytes"] for i in got["image"].to_pylist()])) == want
    check_outputs(output, "emu1", copies)


def test_cli_demo_and_make_tiny(tmp_path):
    def genfleet(*args):
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True)

    for variant, target in FAMILIES.items():
        made = genfleet("make-tiny", target, str(tmp_path / variant))
        assert made.returncode == 0 and "wrote a tiny" in made.stdout, made.stderr[-2000:]
    assert (tmp_path / "emu2" / "model_index.json").is_file() and (tmp_path / "emu1" / "Emu-14B.json").is_file()
    demo = genfleet("demo", "--family", FAMILIES["emu2"], "--output", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = tmp_path / "demo" / "out"
    images = pq.read_table(out / "images").to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in images) == [
        ("autoencode-0", 0), ("compose-0", 0), ("t2i-0", 0), ("t2i-0", 1), ("t2i-1", 0), ("t2i-2", 0)]
    assert [(e["id"], e["kind"]) for e in pq.read_table(out / "errors").to_pylist()] == [("bad-0", "bad_prompt")]
    assert len(list((out / "webdataset").glob("*.tar"))) >= 1
