"""`genfleet demo` and `genfleet make-tiny`: a whole job on a tiny random-weight model.

Everything is local (a local Ray started on demand, a local directory as storage)
and made on the fly by the family itself (its `write_tiny` and `demo`): no downloads.
The demo also scores its images with a tiny random CLIP (`make-tiny clip DIR` writes one),
so that its report shows a clip_score distribution.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.families import get_family
from pipeline.report import format_table
from pipeline.spec import load_spec

TINY_CLIP = "clip"  # `make-tiny clip DIR`: the scorer of `scores.clip`, not a family


def make_tiny(family: str, directory: str) -> str:
    """Write a tiny random-weight model in the family's released layout (or, for `clip`, a
    tiny CLIP for `scores.clip.model`); returns the path a job spec names."""
    if family == TINY_CLIP:
        from modeling.clip_score import write_tiny_clip

        return write_tiny_clip(directory)
    return get_family(family).write_tiny(directory)


def run_demo(output: str, family_name: str) -> int:
    from jobs.driver import run_job

    family = get_family(family_name)
    demo = family.demo()
    root = Path(output).resolve()
    model = family.write_tiny(str(root / "model"))
    clip = make_tiny(TINY_CLIP, str(root / "clip"))
    manifest = root / "manifest.parquet"
    columns = list(dict.fromkeys(k for row in demo.rows for k in row))  # every row's columns, not only the first's
    pq.write_table(pa.table({c: [row.get(c) for row in demo.rows] for c in columns}), manifest)
    on_cpu = [f"stages.{s.name}.num_gpus=0" for s in family.stages(model)]
    spec = load_spec(None, {"family": family_name, "model": model, "manifest": str(manifest), "output": str(root / "out"),
                            "scores.clip.model": clip},
                     ["outputs.rows_per_shard=4", "outputs.webdataset=true", *on_cpu, "scores.clip.num_gpus=0", *demo.settings])
    result = run_job(spec, new_run=True)
    print(f"genfleet demo ({family.name}): job {result['status']}\n{format_table(result)}")
    print(f"  model:    {model}\n  clip:     {clip}\n  manifest: {manifest}\n  outputs:  {root / 'out'}/{{images,embeddings,texts,errors,webdataset}}\n"
          f"  summary:  {root / 'out' / '_summary.json'}\n  report:   {root / 'out' / 'report.html'}")
    return 0 if result["status"] == "completed" else 1
