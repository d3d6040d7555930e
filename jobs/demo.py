"""`genfleet demo` and `genfleet make-tiny`: a whole job on a tiny random-weight model.

Everything is local (a local Ray started on demand, a local directory as
storage) and made on the fly: no downloads.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.report import format_table
from pipeline.spec import load_spec

PROMPTS = ["a red cube on a table", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen, top view",
           "a watercolor fox", "a city street in the rain"]

# per family: the job settings that keep the tiny demo quick on a CPU
DEMO_SETTINGS = {
    "bagel": ["sampler.t2i.num_timesteps=8", "sampler.edit.num_timesteps=8", "sampler.understand.max_think_token_n=12",
              "stages.prepare.options.vae_transform=[128,64,16]", "stages.prepare.options.vit_transform=[112,28,14]"],
    "dalle2": ["sampler.t2i.prior_steps=8", "sampler.t2i.decoder_steps=8", "sampler.variation.decoder_steps=8",
               "sampler.edit.prior_steps=8", "sampler.edit.decoder_steps=8", "sampler.edit.inpaint_resample_times=2"],
}


def make_tiny(family: str, directory: str) -> Path:
    """Write a tiny random-weight model in the family's released layout; returns
    the path a job spec's `model` names (a directory or a config file)."""
    return importlib.import_module(f"modeling.{family}.tiny").write_tiny(directory)


def _png(seed: int, size: int = 64, mask: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((size, size), np.uint8)
        arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
        img = Image.fromarray(arr, "L")
    else:
        y, x = np.mgrid[0:size, 0:size]
        arr = np.stack([x * 4 % 256, y * 4 % 256, rng.integers(0, 256, (size, size))], -1).astype(np.uint8)
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def demo_manifest(family: str) -> pa.Table:
    rows = [{"id": f"t2i-{i}", "task": "t2i", "prompt": p, "num_samples": 2 if i == 0 else 1, "image": None, "mask": None}
            for i, p in enumerate(PROMPTS)]
    if family == "bagel":
        for r in rows:
            r.update(width=64, height=64)
        rows.append({"id": "edit-0", "task": "edit", "prompt": "make it blue", "image": _png(1)})
        rows.append({"id": "understand-0", "task": "understand", "prompt": "what is in the picture?", "image": _png(2)})
    else:
        rows.append({"id": "variation-0", "task": "variation", "prompt": None, "image": _png(1)})
        rows.append({"id": "inpaint-0", "task": "edit", "prompt": "a green square", "image": _png(2), "mask": _png(0, mask=True)})
    rows.append({"id": "bad-0", "task": "t2i", "prompt": "   "})  # shows where bad rows go
    schema = pa.schema([("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()), ("num_samples", pa.int64()),
                        ("width", pa.int64()), ("height", pa.int64()), ("image", pa.binary()), ("mask", pa.binary())])
    return pa.Table.from_pylist(rows, schema=schema)


def run_demo(output: str, family: str) -> int:
    from jobs.driver import run_job
    from pipeline.families import get_family

    root = Path(output).resolve()
    model = make_tiny(family, str(root / "model"))
    manifest = root / "manifest.parquet"
    pq.write_table(demo_manifest(family), manifest)
    on_cpu = [f"stages.{s.name}.num_gpus=0" for s in get_family(family).stages(str(model))]
    spec = load_spec(None, {"family": family, "model": str(model), "manifest": str(manifest), "output": str(root / "out")},
                     ["outputs.rows_per_shard=4", "outputs.webdataset=true", *on_cpu, *DEMO_SETTINGS[family]])
    result = run_job(spec, new_run=True)
    print(f"genfleet demo ({family}): job {result['status']}\n{format_table(result)}")
    print(f"  model:    {model}\n  manifest: {manifest}\n  outputs:  {root / 'out'}/{{images,embeddings,texts,errors,webdataset}}\n"
          f"  summary:  {root / 'out' / '_summary.json'}")
    return 0 if result["status"] == "completed" else 1
