"""Two real Ray nodes (ray.cluster_utils.Cluster, each with 2 fake GPUs and its own CPUs): a tiny
BAGEL and a tiny DALLE2 job with their big stage's two replicas forced onto both nodes make the
same bytes as on one node (BAGEL's replicas also split their LLM layers over their two stand-in
devices, modeling/layer_split.py); a local OUTPUT or manifest, a stage bigger than any one node, and a
model one node cannot read are refused with one line.

The cluster runs in a subprocess (tests/multinode_cluster.py), one start for the module, so that
the session's one-node Ray (the `ray_cluster` fixture, used here for the one-node runs) is left alone.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from modeling.bagel.tiny import write_tiny as write_tiny_bagel
from modeling.dalle2.tiny import write_tiny as write_tiny_dalle2
from pipeline.spec import load_spec
from pipeline.storage import filesystem
from tests.conftest import ROOT, write_manifest

BUCKET = "s3://b-multinode"
NODES = {"count": 2, "num_cpus": 4, "num_gpus": 2}

# both: every model stage in batches of one row, so that which replica gets which row changes nothing; three
# actor pools (the small stages co-located), fewer processes to start on a small machine
BAGEL = ["stages.vae_encode.colocate=true", "stages.vae_decode.colocate=true", "stages.lmm.num_gpus=2", "stages.lmm.device=cpu",
         "stages.prepare.batch_size=1", "stages.vae_encode.batch_size=1", "stages.lmm.batch_size=1", "stages.vae_decode.batch_size=1",
         "sampler.t2i.num_timesteps=3", "sampler.edit.num_timesteps=3", "outputs.rows_per_shard=2",
         "stages.prepare.options={vae_transform: [128, 64, 16], vit_transform: [112, 28, 14]}"]
DALLE2 = ["stages.prior.colocate=true", "stages.upsampler2.colocate=true", "stages.decoder.num_gpus=2", "stages.decoder.device=cpu",
          "stages.prepare.batch_size=1", "stages.prior.batch_size=1", "stages.decoder.batch_size=1", "stages.upsampler2.batch_size=1",
          "sampler.t2i.prior_steps=3", "sampler.t2i.decoder_steps=3", "sampler.variation.decoder_steps=3", "outputs.rows_per_shard=2"]
# the two-node runs: two replicas of the 2-GPU stage, one per node; BAGEL's also splits its LLM layers
# over the replica's two (stand-in) devices (modeling/layer_split.py): neither changes a byte
TWO_REPLICAS = {"bagel": ["stages.lmm.replicas=2", "stages.lmm.options.split_devices=2"], "dalle2": ["stages.decoder.replicas=2"]}


def _png(w, h, seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _images(url: str) -> list[tuple[tuple[str, int], bytes]]:
    """Every image row of an output: ((id, sample_index), PNG bytes), duplicates kept."""
    fs, path = filesystem(url)
    fs.invalidate_cache(f"{path}/images")  # s3fs caches listings per process; the workers wrote since
    files = sorted(fs.glob(f"{path}/images/*.parquet"))
    rows = pa.concat_tables([pq.read_table(fs.open(f, "rb")) for f in files]).to_pylist() if files else []
    return [((r["id"], r["sample_index"]), r["image"]["bytes"]) for r in rows]


def _can_hide_a_directory() -> bool:
    """Whether a mount namespace (unshare -m) with its own tmpfs can be made here (root, or user namespaces)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def setup(s3_server, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=BUCKET.removeprefix("s3://"))
    d = tmp_path_factory.mktemp("multinode")
    (d / "hidden").mkdir()  # the models' folder: one added node will not see it
    bagel_rows = [
        {"id": "t2i", "task": "t2i", "prompt": "a red cube", "num_samples": 2, "width": 32, "height": 32, "image": None},
        {"id": "ball", "task": "t2i", "prompt": "a green ball", "num_samples": 1, "width": 32, "height": 32, "image": None},
        {"id": "edit", "task": "edit", "prompt": "make it blue", "num_samples": 1, "width": None, "height": None, "image": _png(40, 30, 0)},
    ]
    dalle2_rows = [
        {"id": "t2i", "task": "t2i", "prompt": "a red cube", "num_samples": 2, "image": None, "mask": None},
        {"id": "var", "task": "variation", "prompt": None, "num_samples": 1, "image": _png(40, 48, 1), "mask": None},
    ]
    return {
        "bagel": {"family": "bagel", "model": str(write_tiny_bagel(d / "hidden" / "bagel")),
                  "manifest": write_manifest(f"{BUCKET}/bagel.parquet", bagel_rows)},
        "dalle2": {"family": "dalle2", "model": str(write_tiny_dalle2(d / "hidden" / "dalle2")),
                   "manifest": write_manifest(f"{BUCKET}/dalle2.parquet", dalle2_rows)},
        "dir": d,
        "local_manifest": write_manifest(str(d / "local.parquet"), bagel_rows),
    }


@pytest.fixture(scope="module")
def cluster(setup):
    """Every step on one 2-node cluster, in order; the results by job name (and the hidden node's id)."""
    d, bagel = setup["dir"], setup["bagel"]
    hide = _can_hide_a_directory()
    steps = [
        {"job": "bagel", "spec": {**bagel, "output": f"{BUCKET}/bagel-2n"}, "sets": [*BAGEL, *TWO_REPLICAS["bagel"]]},
        {"job": "dalle2", "spec": {**setup["dalle2"], "output": f"{BUCKET}/dalle2-2n"}, "sets": [*DALLE2, *TWO_REPLICAS["dalle2"]]},
        {"job": "local_output", "spec": {**bagel, "output": str(d / "local-out")}, "sets": BAGEL},
        {"job": "local_manifest", "spec": {**bagel, "manifest": setup["local_manifest"], "output": f"{BUCKET}/lm"}, "sets": BAGEL},
        {"job": "three_gpus", "spec": {**bagel, "output": f"{BUCKET}/g3"}, "sets": [*BAGEL, "stages.lmm.num_gpus=3"]},
        *([{"hide": str(d / "hidden")}, {"job": "unreadable", "spec": {**bagel, "output": f"{BUCKET}/u"}, "sets": BAGEL}] if hide else []),
    ]
    results = d / "results.json"
    plan = {"nodes": NODES, "results": str(results), "steps": steps}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_cluster.py")], input=json.dumps(plan), text=True,
                          capture_output=True, cwd=ROOT,
                          # each pool starts its data only once all its replicas are up: on a busy machine a
                          # tiny job could otherwise end before the second replica (the second node's) starts
                          env={**os.environ, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"})
    assert proc.returncode == 0 and results.exists(), proc.stderr[-4000:]
    out = json.loads(results.read_text())
    by_job = {s["job"]: s for s in out["steps"] if "job" in s}
    hidden = next((s["hidden_node"] for s in out["steps"] if "hidden_node" in s), None)
    return {"nodes": out["nodes"], "jobs": by_job, "hidden": hidden, "can_hide": hide}


def _one_node(setup, family: str, sets: list[str]) -> list[tuple[tuple[str, int], bytes]]:
    output = f"{BUCKET}/{family}-1n"
    result = run_job(load_spec(None, {**setup[family], "output": output}, sets), interactive=False)
    assert result["status"] == "completed", result
    return _images(output)


@pytest.mark.parametrize("family, sets, stage_gpus", [("bagel", BAGEL, 2), ("dalle2", DALLE2, 2)])
def test_two_nodes_make_the_bytes_of_one(ray_cluster, setup, cluster, family, sets, stage_gpus):
    step = cluster["jobs"][family]
    assert "result" in step, step
    assert step["result"]["status"] == "completed" and step["result"]["errors"] == 0, step["result"]
    # the big stage's two replicas (the actors asking for 2 GPUs) ran one on each node
    big = [a for a in step["actors"] if (a["resources"] or {}).get("GPU") == stage_gpus]
    assert len(big) == 2 and sorted(a["node_id"] for a in big) == sorted(cluster["nodes"]), step["actors"]

    two_nodes = _images(f"{BUCKET}/{family}-2n")
    keys = [k for k, _ in two_nodes]
    assert len(keys) == len(set(keys)), keys  # every (id, sample) once
    one_node = _one_node(setup, family, sets)  # the session's one-node Ray: one replica
    assert sorted(keys) == sorted(k for k, _ in one_node)
    assert dict(two_nodes) == dict(one_node)


def test_local_output_refused_on_two_nodes(cluster, setup):
    msg = cluster["jobs"]["local_output"]["refused"]
    assert "\n" not in msg
    assert f"output {setup['dir'] / 'local-out'} is a local path" in msg and "2 nodes" in msg and "s3://" in msg, msg
    assert not [p for p in (setup["dir"] / "local-out").rglob("*")]  # refused before anything was written (the lease is gone)


def test_local_manifest_refused_on_two_nodes(cluster, setup):
    msg = cluster["jobs"]["local_manifest"]["refused"]
    assert "\n" not in msg
    assert f"manifest {setup['local_manifest']} is a local path" in msg and "2 nodes" in msg, msg


def test_a_stage_must_fit_one_node_not_the_sum(cluster):
    # 4 GPUs in the cluster, 2 on each node: a replica of 3 fits nowhere
    msg = cluster["jobs"]["three_gpus"]["refused"]
    assert "\n" not in msg
    assert "stages.lmm needs 3 GPU(s)" in msg and "2 nodes" in msg, msg


def test_model_unreadable_on_one_node_refused(cluster, setup):
    if not cluster["can_hide"]:
        pytest.skip("no mount namespace here (unshare -m): a node with its own filesystem cannot be made")
    msg = cluster["jobs"]["unreadable"]["refused"]
    assert "\n" not in msg
    others = cluster["nodes"]
    assert f"model {setup['bagel']['model']} is not readable on 1 of 3 nodes" in msg, msg
    assert cluster["hidden"][:12] in msg and "No such file or directory" in msg, msg
    assert not any(n[:12] in msg for n in others), msg
