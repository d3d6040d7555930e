"""The runner's machinery at scale, with a trivial CPU stage (bench/scale_family.py).

    python bench/bench_scale.py --workdir /tmp/scale                 # 10^4, 10^5, 10^6 rows; 10^7 start-up
    python bench/bench_scale.py --workdir /tmp/scale --sizes 10000 --big 0   # a smoke run

For each size: a fresh `genfleet run` (wall, rows/s, driver peak RSS), the same command again
with nothing left to do, and `genfleet status`; the trivial stage keeps no model, so it runs in
the job's tasks, fused with reading. At the largest size also: the manifest cut into 100 files,
the stage in an actor pool as model stages run (1 and 2 replicas), the plain Ray Data pipeline
(read_parquet -> map_batches -> write_parquet, the same per-row work) on both manifests in the
same run, and a resume after SIGKILL at 50%, the stage in an actor (time from launch to the
first new commit, and to the end). At --big rows: a completed output is made directly (commit records
and their index, as a finished run leaves them) and the start-up of a re-run and of `status`
are timed, first with the plan not cached (as after an upgrade), then cached. Every command is
a fresh process, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILY = "bench.scale_family:FAMILY"
PHASES = ("runs", "resume", "big")
ROWS_PER_SHARD = 1024  # with the stage's batch of 1024: samples travel in packs of 64 (pipeline/rows.py)


def make_manifest(path: Path, rows: int, files: int) -> Path:
    if path.exists() and len(list(path.glob("*.parquet"))) == files:  # made by an earlier phase
        return path
    path.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for f in range(files):
        lo, hi = f * per, min(rows, (f + 1) * per)
        ids = pa.array(np.char.add("r", np.char.zfill(np.arange(lo, hi).astype(str), 9)))
        pq.write_table(pa.table({"id": ids, "prompt": pa.array(["a trivial prompt"] * (hi - lo))}), path / f"part-{f:05d}.parquet",
                       row_group_size=100_000)
    return path


class Watch:
    """A process, its wall time and its peak RSS (polled from /proc: the driver itself)."""

    def __init__(self, args: list[str], **kw):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}, **kw)
        self.peak_kb = 0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS"))
                self.peak_kb = max(self.peak_kb, rss)
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.1)

    def wait(self) -> tuple[float, str]:
        out, _ = self.proc.communicate()
        wall = time.perf_counter() - self.start
        if self.proc.returncode != 0:
            raise SystemExit(f"{self.proc.args} failed ({self.proc.returncode}):\n{out[-4000:]}")
        return wall, out

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


def genfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *args]


def run_args(manifest: Path, output: Path, model: str = "scale") -> list[str]:
    """`model`: "scale", the stage in the job's tasks; "actor", in an actor pool, as model stages run."""
    return genfleet("run", "--family", FAMILY, "--model", model, "--manifest", str(manifest), "--output", str(output),
                    "--set", f"outputs.rows_per_shard={ROWS_PER_SHARD}")


def committed_rows(output: Path) -> int:
    """Pairs in the commit records so far (a shard holds whole blocks: rows_per_shard or more)."""
    d = output / "_commits"
    rows = 0
    for p in d.glob("*.parquet") if d.exists() else ():
        try:
            rows += pq.read_metadata(p).num_rows
        except (OSError, pa.ArrowException):  # being written
            pass
    return rows


def plain_ray_data(manifest: Path, output: Path) -> None:
    """The baseline: what a user writes with Ray Data alone, the same per-row work."""
    import ray

    ray.init(include_dashboard=False, logging_level="WARNING")  # as a user starts it: a CPU per core
    ray.data.DataContext.get_current().enable_progress_bars = False

    def emit(batch: pa.Table) -> pa.Table:
        e = np.stack([np.random.default_rng(abs(hash(i)) % 2**63).random(4, dtype=np.float32) for i in batch.column("id").to_pylist()])
        return pa.table({"id": batch.column("id"), "e": pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), 4)})

    ray.data.read_parquet(str(manifest)).map_batches(emit, batch_format="pyarrow", batch_size=1024).write_parquet(str(output))
    ray.shutdown()


def fake_completed_output(manifest: Path, output: Path) -> None:
    """A completed output of the trivial job over `manifest`, made directly: its commit records
    (in the sink's format, ROWS_PER_SHARD pairs each), their index, _job.json, as a finished run leaves them."""
    from jobs.driver import prepare
    from pipeline.keys import pair_hashes
    from pipeline.manifest import open_manifest
    from pipeline.resume import begin_run, read_log, write_index
    from pipeline.sink import COMMITS, STATS_KEY, _parquet_bytes
    from pipeline.spec import load_spec

    spec = load_spec(None, {"family": FAMILY, "model": "scale", "manifest": str(manifest), "output": str(output)},
                     [f"outputs.rows_per_shard={ROWS_PER_SHARD}"])
    job = prepare(spec, new_run=True)
    begin_run(str(output), job.fingerprint, manifest=str(manifest), expected_pairs=job.plan.expected_pairs, new_run=True,
              retry_errors=False, log=job.log)
    (output / COMMITS).mkdir(parents=True, exist_ok=True)
    for f in open_manifest(str(manifest)).files:
        ids = pq.read_table(f.path, columns=["id"]).column("id")
        for lo in range(0, len(ids), ROWS_PER_SHARD):
            chunk = ids.slice(lo, ROWS_PER_SHARD)
            n = len(chunk)
            name = f"part-fake{f.first_ordinal + lo:012d}"
            table = pa.table({"id": chunk, "sample_index": pa.array(np.zeros(n, np.int64)),
                              "key": pa.array(pair_hashes(chunk, pa.array(np.zeros(n, np.int64))), pa.uint64()),
                              "status": pa.array(["ok"] * n), "covers": pa.array(np.ones(n, np.int32)), "kind": pa.nulls(n, pa.string()),
                              "file": pa.array([f.identity] * n), "row": pa.array(np.arange(lo, lo + n, dtype=np.int64))})
            stats = {"shard": name, "rows": n, "pairs": n, "images": 0, "texts": 0, "errors": 0, "retryable": 0, "errors_by_kind": {},
                     "retryable_by_kind": {}, "stage_seconds": {}, "stage_rows": {}, "committed_at": time.time()}
            (output / COMMITS / f"{name}.parquet").write_bytes(_parquet_bytes(table, {STATS_KEY: json.dumps(stats).encode()}))
    write_index(str(output), read_log(str(output)))


def figure(label: str, rows: int | None, wall: float, peak_kb: int | None = None, note: str = "") -> dict:
    f = {"run": label, "rows": rows, "wall_s": wall, "rows_per_s": rows / wall if rows else None,
         "peak_mb": peak_kb / 1024 if peak_kb else None, "note": note}
    print(json.dumps(f), flush=True)  # as it goes: a long run cut short still shows what it measured
    return f


def measure(table: list[dict], label: str, rows: int | None, args: list[str]) -> None:
    """Run one command to its end; its wall time and the driver's peak RSS join the table."""
    w = Watch(args)
    wall, _ = w.wait()
    table.append(figure(label, rows, wall, w.peak_kb))


def scale_run(work: Path, rows: int, files: int, table: list[dict]) -> None:
    tag = f"{rows:.0e} rows, {files} file(s)"
    manifest = make_manifest(work / f"m-{rows}-{files}", rows, files)
    out = work / f"out-{rows}-{files}"
    measure(table, f"{tag}: run", rows, run_args(manifest, out))
    measure(table, f"{tag}: re-run, nothing to do", None, run_args(manifest, out))
    measure(table, f"{tag}: status", None, genfleet("status", str(out)))


def resume_after_kill(work: Path, rows: int, table: list[dict]) -> None:
    manifest = work / f"m-{rows}-1"
    out = work / f"out-kill-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    w = Watch(run_args(manifest, out, "actor"))  # as a model family resumes: its stage in an actor
    while committed_rows(out) < rows // 2:
        if w.proc.poll() is not None:
            raise SystemExit("the run ended before half its rows were committed")
        time.sleep(0.2)
    w.kill()
    time.sleep(2)  # a write task of the killed run's Ray may still land its commit: count it as before
    before = committed_rows(out)
    launched = time.time()
    w = Watch(run_args(manifest, out, "actor"))
    while committed_rows(out) <= before and w.proc.poll() is None:
        time.sleep(0.05)
    first = time.time() - launched
    wall, log = w.wait()
    ready = phase_started(log, "generating") - launched  # Ray started and the stage loaded
    table.append(figure(f"{rows:.0e} rows: resume after SIGKILL at 50%", rows - before, wall, w.peak_kb,
                        f"Ray start + model load {ready:.1f} s; first new commit {first:.1f} s after launch, "
                        f"{first - ready:.1f} s after generating began"))


def phase_started(log: str, phase: str) -> float:
    """When the run's progress lines first name `phase` (their local-time stamps, as epoch seconds)."""
    for line in log.splitlines():
        if " genfleet progress " in line and f" {phase}," in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    raise SystemExit(f"no progress line names {phase!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--big", type=int, default=10_000_000, help="rows of the completed output whose start-up is timed (0: skip)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="which measurements (default: all)")
    ap.add_argument("--plain", nargs=2, type=Path, help=argparse.SUPPRESS)  # internal: run the Ray Data baseline
    args = ap.parse_args()
    if args.plain:
        plain_ray_data(*args.plain)
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    table: list[dict] = []
    top = max(args.sizes)
    if "runs" in args.phases:
        for rows in args.sizes:
            scale_run(work, rows, 1, table)
        scale_run(work, top, 100, table)
        # the stage in an actor pool, as a model family's stages run: one replica, then two
        measure(table, f"{top:.0e} rows, 1 file(s): run, stage in 1 actor", top,
                run_args(work / f"m-{top}-1", work / f"out-{top}-a1", "actor"))
        measure(table, f"{top:.0e} rows, 1 file(s): run, stage in 2 actors", top,
                run_args(work / f"m-{top}-1", work / f"out-{top}-a2", "actor") + ["--set", "stages.emit.replicas=2"])
        for files in (1, 100):
            measure(table, f"{top:.0e} rows, {files} file(s): plain Ray Data read -> map_batches -> write", top,
                    [sys.executable, __file__, "--workdir", str(work), "--plain", str(work / f"m-{top}-{files}"),
                     str(work / f"plain-{top}-{files}")])
    if "resume" in args.phases:
        make_manifest(work / f"m-{top}-1", top, 1)
        resume_after_kill(work, top, table)
    if args.big and "big" in args.phases:
        manifest = make_manifest(work / f"m-{args.big}-100", args.big, 100)
        out = work / f"out-big-{args.big}"
        fake_completed_output(manifest, out)
        for label in ("plan not cached", "plan cached"):
            if label == "plan not cached":
                for p in (out / "_plan").glob("*.parquet"):
                    p.unlink()
            measure(table, f"{args.big:.0e} committed: re-run, nothing to do ({label})", None, run_args(manifest, out))
        measure(table, f"{args.big:.0e} committed: status", None, genfleet("status", str(out)))
    print("| run | wall s | rows/s | driver peak MB | note |\n|---|---:|---:|---:|---|")
    for t in table:
        rate = f"{t['rows_per_s']:,.0f}" if t["rows_per_s"] else "–"
        peak = f"{t['peak_mb']:.0f}" if t["peak_mb"] else "–"
        print(f"| {t['run']} | {t['wall_s']:.1f} | {rate} | {peak} | {t['note']} |")
    print(f"\ngenfleet / plain Ray Data on the same manifest at {top:.0e} rows (same run):")
    for files in (1, 100):
        tag = f"{top:.0e} rows, {files} file(s): "
        plain = next((t for t in table if t["run"].startswith(tag + "plain")), None)
        for ours in (t for t in table if t["run"].startswith(tag + "run") and plain):
            print(f"  {ours['run']}: {ours['rows_per_s'] / plain['rows_per_s']:.2f}x")
    (work / "bench_scale.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
