"""`genfleet demo` and `genfleet make-tiny`: a whole job on a tiny random-weight model.

Everything is local (a local Ray started on demand, a local directory as storage)
and made on the fly by the family itself (its `write_tiny` and `demo`): no downloads.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.families import get_family
from pipeline.report import format_table
from pipeline.spec import load_spec


def make_tiny(family: str, directory: str) -> str:
    """Write a tiny random-weight model in the family's released layout; returns the
    path a job spec's `model` names (a directory or a config file)."""
    return get_family(family).write_tiny(directory)


def run_demo(output: str, family_name: str) -> int:
    from jobs.driver import run_job

    family = get_family(family_name)
    demo = family.demo()
    root = Path(output).resolve()
    model = family.write_tiny(str(root / "model"))
    manifest = root / "manifest.parquet"
    columns = list(dict.fromkeys(k for row in demo.rows for k in row))  # every row's columns, not only the first's
    pq.write_table(pa.table({c: [row.get(c) for row in demo.rows] for c in columns}), manifest)
    on_cpu = [f"stages.{s.name}.num_gpus=0" for s in family.stages(model)]
    spec = load_spec(None, {"family": family_name, "model": model, "manifest": str(manifest), "output": str(root / "out")},
                     ["outputs.rows_per_shard=4", "outputs.webdataset=true", *on_cpu, *demo.settings])
    result = run_job(spec, new_run=True)
    print(f"genfleet demo ({family.name}): job {result['status']}\n{format_table(result)}")
    print(f"  model:    {model}\n  manifest: {manifest}\n  outputs:  {root / 'out'}/{{images,embeddings,texts,errors,webdataset}}\n"
          f"  summary:  {root / 'out' / '_summary.json'}")
    return 0 if result["status"] == "completed" else 1
