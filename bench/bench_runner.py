"""The runner's overhead: a synthetic GPU stage alone vs the same stage inside a job.

    python bench/bench_runner.py --rows 4000 --batch-size 32 --matmuls 50

Bare: the stage's batch function in a plain loop (GPU work + noise + copy back).
Job: genfleet run over a local manifest of the same rows (read, validate, the stage
on a GPU actor, PNG encode in CPU tasks, Parquet shards). Reported: end-to-end
(start-up included) and steady state (between the first and the last commit).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_family import build_render  # noqa: E402
from pipeline.family import StageContext  # noqa: E402
from pipeline.resume import read_results  # noqa: E402
from pipeline.sample import Sample  # noqa: E402
from pipeline.spec import load_spec  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare(rows: int, batch: int, matmuls: int, device: str) -> float:
    fn = build_render(StageContext("synthetic", device, "bfloat16", {"matmuls_per_image": matmuls}))
    fake = [Sample(id=f"s{i}", sample_index=0, task="t2i", sample_seed=i) for i in range(batch)]
    fn(fake)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(rows // batch):
        fn(fake)
    sync(device)
    return (rows // batch) * batch / (time.perf_counter() - start)


def job(rows: int, batch: int, matmuls: int, device: str, workdir: Path) -> tuple[float, float, float]:
    from jobs.driver import run_job

    manifest = workdir / "m.parquet"
    pq.write_table(pa.table({"id": [f"r{i:07d}" for i in range(rows)], "prompt": ["x"] * rows}), manifest)
    out = workdir / "out"
    spec = load_spec(None, {"family": "bench.synthetic_family:FAMILY", "model": "synthetic", "manifest": str(manifest), "output": str(out)},
                     [f"stages.render.batch_size={batch}", f"stages.render.options.matmuls_per_image={matmuls}",
                      "outputs.rows_per_shard=500", f"stages.render.device={device}",
                      *(["stages.render.num_gpus=0"] if device == "cpu" else [])])
    start = time.time()
    result = run_job(spec, interactive=False)
    wall = time.time() - start
    commits = sorted(read_results(str(out)), key=lambda c: c.result.committed_at)
    t0, t1 = commits[0].result.committed_at, commits[-1].result.committed_at
    steady_rows = sum(c.result.rows for c in commits[1:])
    steady = steady_rows / (t1 - t0) if t1 > t0 else float("nan")
    return result["images"] / wall, steady, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--matmuls", type=int, default=50, help="4096^3 bf16 matmuls per image (GPU work per image)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (use --matmuls 0)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    b = bare(args.rows, args.batch_size, args.matmuls, args.device)
    with tempfile.TemporaryDirectory() as d:
        e2e, steady, wall = job(args.rows, args.batch_size, args.matmuls, args.device, Path(d))
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# runner overhead, {name}, {args.rows} images 256², batch {args.batch_size}, {args.matmuls} matmuls/image\n")
    print("| path | images/s | fraction of bare |\n|---|---|---|")
    print(f"| bare stage loop | {b:.1f} | 1.00 |")
    print(f"| genfleet job, end to end ({wall:.1f} s, start-up included) | {e2e:.1f} | {e2e / b:.2f} |")
    print(f"| genfleet job, steady state | {steady:.1f} | {steady / b:.2f} |")


if __name__ == "__main__":
    main()
