"""A real BAGEL-7B-MoT job through `genfleet run`, against bench/bench_bagel.py in the same process sequence.

    python bench/bench_bagel_job.py --sizes 512 --rows 64          # one H200: checkpoint, bench 512², job 512²
    python bench/bench_bagel_job.py --sizes 512 1024 --rows 64 16  # both sizes
    python bench/bench_bagel_job.py --tiny                          # the same path on CPU, tiny model

Phases, each a fresh process, each printed with its start time:
1. checkpoint: bench/bagel_checkpoint.py writes a random-weight checkpoint in the released
   layout to WORKDIR/ckpt (kept if WORKDIR/ckpt.json says it is complete).
2. per size: bench/bench_bagel.py at that size and the job's batch (`--attention split --compile`),
   then `genfleet run` (`python -m jobs.cli run`, what the `genfleet` script calls) with
   configs/bagel-7b-job.yaml over a t2i manifest of ROWS rows at that size, the family being
   bench/bagel_timed.py (the bagel family, its stage builds and batches timestamped). The
   checkpoint's pages are dropped from the page cache before each job, so its load reads the disk.
A background process samples the GPU (NVML: utilisation, memory) every second throughout.
Reported per size: the bench's images/h; the job's lmm model load (the stage's build: tokenizer,
weights straight to the GPU); time from launch to the first committed shard; the job's images/h
over its lmm batches after the first (steady: the first batch also compiles) and from the first
batch's start, and end to end; their ratio to the bench; GPU utilisation over the same windows.
--time-limit S: skip or cut phases so that the whole stays within S seconds (partial results
are kept in OUT/results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

START = time.time()
WORDS = ("a red cube on a table", "a photo of a cat sitting on a sofa", "a watercolor painting of a mountain lake at sunrise",
         "an astronaut riding a horse on the moon", "the quick brown fox jumps over the lazy dog", "digital art, high quality",
         "a starry night over the harbour", "a green car in the rain", "apples on a plate", "a dog with a hat")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - START:6.1f}s] {msg}", flush=True)


def sample_gpu(path: str, interval: float) -> None:
    """Append `time,util%,memory MiB` every `interval` s until killed (NVML, else nvidia-smi; nothing without a GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)

        def read() -> tuple[float, float]:
            return pynvml.nvmlDeviceGetUtilizationRates(h).gpu, pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
    except Exception as e:
        if not shutil.which("nvidia-smi"):
            print(f"# GPU sampler: no NVML ({e}) and no nvidia-smi: no samples", flush=True)
            return
        query = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

        def read() -> tuple[float, float]:
            u, m = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split(",")
            return float(u), float(m)
    with open(path, "a") as f:
        while True:
            t = time.time()
            u, m = read()
            f.write(f"{t:.3f},{u},{m:.0f}\n")
            f.flush()
            time.sleep(max(0.0, interval - (time.time() - t)))


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run `cmd` in its own process group, output appended to `log`; killed (the group) at `timeout`."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        pos = f.tell()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            rc = 124
    with open(log) as f:
        f.seek(pos)
        return rc, f.read()


def prompts(n: int, seed: int) -> list[str]:
    import random

    r = random.Random(seed)
    return [", ".join(r.sample(WORDS, r.randint(2, 4))) for _ in range(n)]


def write_manifest(path: Path, size: int, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ps = prompts(rows, size)
    pq.write_table(pa.table({"id": [f"t2i-{size}-{i:04d}" for i in range(rows)], "task": ["t2i"] * rows, "prompt": ps,
                             "width": [size] * rows, "height": [size] * rows, "seed": list(range(rows))}), path)


def bench_figure(text: str, size: int, batch: int) -> float | None:
    """images/hour of the bench's `| t2i | SIZE² | BATCH | ...` row."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] == "t2i" and cells[1] == f"{size}²" and cells[2] == str(batch):
            return float(cells[5])
    return None


def read_samples(path: Path) -> list[tuple[float, float, float]]:
    if not path.is_file():
        return []
    return [tuple(float(x) for x in line.split(",")) for line in path.read_text().splitlines() if line.count(",") == 2]


def mean_util(samples, t0: float, t1: float) -> float | None:
    us = [u for t, u, _ in samples if t0 <= t <= t1]
    return round(sum(us) / len(us), 1) if us else None


def analyse(size: int, launch: float, end: float, events: list[dict], output: Path, samples) -> dict:
    from pipeline.resume import read_results

    mine = [e for e in events if launch <= e["t0"] <= end]
    builds = {e["stage"]: e for e in mine if e["kind"] == "build"}
    lmm = sorted((e for e in mine if e["kind"] == "batch" and e["stage"] == "lmm"), key=lambda e: e["t0"])
    try:
        commits = sorted(c.result.committed_at for c in read_results(str(output)))
    except Exception:  # no commit (a job cut short)
        commits = []
    r: dict = {"size": size, "wall_s": round(end - launch, 1), "lmm_batches": len(lmm), "images": sum(e["rows"] for e in lmm)}
    if "lmm" in builds:
        b = builds["lmm"]
        r["actor_start_s"] = round(b["t0"] - launch, 1)  # driver checks, Ray start, actor start, CUDA init
        r["model_load_s"] = round(b["t1"] - b["t0"], 1)
    weights = [e for e in mine if e["kind"] == "weights" and e["stage"] == "lmm" and e["what"] == "load_bagel"]
    if weights:
        w = weights[0]
        r["weights_load_s"] = round(w["t1"] - w["t0"], 1)
        r["weights_gb_s"] = round(w["bytes"] / 1e9 / max(w["t1"] - w["t0"], 1e-9), 2)
    if "vae_decode" in builds:
        r["ae_load_s"] = round(builds["vae_decode"]["t1"] - builds["vae_decode"]["t0"], 1)
    if commits:
        r["first_commit_s"] = round(commits[0] - launch, 1)
        r["commits"] = len(commits)
    if lmm:
        t_first, t_first_end, t_last = lmm[0]["t0"], lmm[0]["t1"], lmm[-1]["t1"]
        r["first_batch_at_s"] = round(t_first - launch, 1)
        r["batch_s"] = [round(e["t1"] - e["t0"], 2) for e in lmm]
        r["gaps_s"] = [round(b["t0"] - a["t1"], 2) for a, b in zip(lmm, lmm[1:])]
        r["sizes"] = sorted({tuple(s) for e in lmm for s in e["sizes"]})
        r["iph_from_first"] = round(3600 * r["images"] / (t_last - t_first), 1)
        if len(lmm) > 1:
            r["iph_steady"] = round(3600 * sum(e["rows"] for e in lmm[1:]) / (t_last - t_first_end), 1)
        r["util_from_first"] = mean_util(samples, t_first, t_last)
        r["util_steady"] = mean_util(samples, t_first_end, t_last) if len(lmm) > 1 else None
    r["iph_end_to_end"] = round(3600 * r["images"] / (end - launch), 1)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU, few steps (a smoke test of every phase)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=None, help="manifest rows per size")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=ROOT / ".bagel-job")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / ".bagel-job" / "report"))
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole; later phases are cut or skipped")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--sample-gpu", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sample_gpu:
        sample_gpu(args.sample_gpu, 1.0)
        return 0
    tiny = args.tiny
    sizes = args.sizes or ([64] if tiny else [512, 1024])
    rows = args.rows or ([8] if tiny else [64, 16])[: len(sizes)]
    batch = args.batch_size or (2 if tiny else 8)
    steps = args.steps or (4 if tiny else 50)
    if len(rows) != len(sizes):
        ap.error("--rows needs one count per size")
    limit = args.time_limit or float("inf")
    left = lambda: limit - (time.time() - START)  # noqa: E731
    work, out = args.workdir, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log, gpu_csv, events_path = out / "log.txt", out / "gpu.csv", out / "events.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    sampler = subprocess.Popen([sys.executable, __file__, "--sample-gpu", str(gpu_csv)], cwd=ROOT, start_new_session=True)
    results: dict = {"device": None, "sizes": sizes, "rows": rows, "batch": batch, "steps": steps, "jobs": [], "bench": {}}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    try:
        import torch

        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else "cpu"
        say(f"{results['device']}, torch {torch.__version__}; workdir {work} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free)")
        ckpt, done = work / "ckpt", work / "ckpt.json"
        if done.is_file() and json.loads(done.read_text()).get("tiny") == tiny:
            results["checkpoint"] = json.loads(done.read_text()) | {"reused": True}
            say(f"checkpoint: reusing {ckpt}")
        else:
            say("checkpoint: building (random weights, released layout)")
            shutil.rmtree(ckpt, ignore_errors=True)
            done.unlink(missing_ok=True)
            rc, text = run([sys.executable, "bench/bagel_checkpoint.py", str(ckpt), *(["--tiny"] if tiny else [])], log, left(), env)
            if rc:
                say(f"checkpoint: failed (rc {rc}):\n{text[-3000:]}")
                return 1
            results["checkpoint"] = json.loads(text.strip().splitlines()[-1]) | {"tiny": tiny}
            done.write_text(json.dumps(results["checkpoint"]))
            say(f"checkpoint: {results['checkpoint']}")
        save()
        from bagel_checkpoint import drop_cache

        for size, n in zip(sizes, rows):
            if not args.no_bench and left() > (60 if tiny else 90 + size * size / 1024**2 * 130):
                say(f"bench {size}², batch {batch}")
                cmd = [sys.executable, "bench/bench_bagel.py", "--sizes", str(size), "--batch-sizes", str(batch), "--steps", str(steps),
                       "--attention", "split", "--no-edit", *(["--tiny"] if tiny else ["--compile"])]
                rc, text = run(cmd, log, left() - 10, env)
                results["bench"][str(size)] = bench_figure(text, size, batch)
                say(f"bench {size}²: rc {rc}, {results['bench'][str(size)]} images/h\n{text[-1500:]}")
                save()
            if left() < (60 if tiny else 120):
                say(f"job {size}²: skipped ({left():.0f}s left)")
                continue
            manifest, output = work / f"manifest-{size}.parquet", work / f"out-{size}"
            write_manifest(manifest, size, n)
            shutil.rmtree(output, ignore_errors=True)
            for f in ("ema.safetensors", "ae.safetensors"):
                drop_cache(ckpt / f)
            sets = [f"stages.lmm.batch_size={batch}", f"sampler.t2i.num_timesteps={steps}"]
            if tiny:
                sets += ["stages.lmm.options.compile=false", "ray.num_cpus=4"]
            cmd = [sys.executable, "-m", "jobs.cli", "run", "configs/bagel-7b-job.yaml", "--family", "bench.bagel_timed:FAMILY",
                   "--model", str(ckpt), "--manifest", str(manifest), "--output", str(output),
                   *(["--cpu"] if tiny else []), *[a for s in sets for a in ("--set", s)]]
            say(f"job {size}²: {n} rows, batch {batch}, {steps} steps")
            launch = time.time()
            rc, text = run(cmd, log, left() - 5, dict(env, GENFLEET_BENCH_EVENTS=str(events_path)))
            end = time.time()
            events = [json.loads(x) for x in events_path.read_text().splitlines()] if events_path.is_file() else []
            r = analyse(size, launch, end, events, output, read_samples(gpu_csv)) | {"rc": rc, "rows": n}
            bench = results["bench"].get(str(size))
            if bench and r.get("iph_steady"):
                r["ratio_steady"] = round(r["iph_steady"] / bench, 3)
            if bench and r.get("iph_from_first"):
                r["ratio_from_first"] = round(r["iph_from_first"] / bench, 3)
            results["jobs"].append(r)
            save()
            say(f"job {size}²: rc {rc}; {r}\n{text[-1500:]}")
    finally:
        os.killpg(sampler.pid, signal.SIGTERM)
        sampler.wait()
        save()
        print_table(results)
    return 0


def print_table(results: dict) -> None:
    print(f"\n# BAGEL job vs bench: {results['device']}, batch {results['batch']}, {results['steps']} steps; "
          f"checkpoint {results.get('checkpoint')}\n")
    print("| size | rows | bench images/h | job images/h, batches 2..N | ratio | job images/h, from batch 1 | ratio | end to end "
          "| lmm model load s | launch → first batch s | launch → first commit s | GPU util % batches 2..N | from batch 1 | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["jobs"]:
        g = lambda k: "–" if r.get(k) is None else r[k]  # noqa: E731
        print(f"| {r['size']}² | {r['images']}/{r['rows']} | {results['bench'].get(str(r['size'])) or '–'} | {g('iph_steady')} "
              f"| {g('ratio_steady')} | {g('iph_from_first')} | {g('ratio_from_first')} | {g('iph_end_to_end')} | {g('model_load_s')} "
              f"| {g('first_batch_at_s')} | {g('first_commit_s')} | {g('util_steady')} | {g('util_from_first')} | {g('wall_s')} |")
    for r in results["jobs"]:
        print(f"# {r['size']}²: lmm batches (s) {r.get('batch_s')}, gaps (s) {r.get('gaps_s')}, actor start {r.get('actor_start_s')} s, "
              f"weights (load_bagel) {r.get('weights_load_s')} s at {r.get('weights_gb_s')} GB/s, AE load {r.get('ae_load_s')} s, commits {r.get('commits')}, rc {r['rc']}")


if __name__ == "__main__":
    sys.exit(main())
