"""A real BAGEL-7B-MoT job through `genfleet run`, against bench/bench_bagel.py in the same process sequence.

    python bench/bench_bagel_job.py                                  # one H200: 16 rows at 1024², 64 at 512², batch 8
    python bench/bench_bagel_job.py --sizes 512 --rows 64            # one size
    python bench/bench_bagel_job.py --tiny                           # the same path on CPU, tiny model

Phases, each a fresh process, each printed with its start time:
1. checkpoint: bench/bagel_checkpoint.py writes a random-weight checkpoint in the released
   layout to WORKDIR/ckpt (kept if WORKDIR/ckpt.json says it is complete).
2. bench: bench/bench_bagel.py at every size and the job's batch (`--attention split --compile`).
3. job: `genfleet run` (`python -m jobs.cli run`, what the `genfleet` script calls) with
   configs/bagel-7b-job.yaml over one t2i manifest (ROWS rows of each size, in the order given),
   the family being bench/bagel_timed.py (the bagel family, its stage builds and batches
   timestamped). The checkpoint's pages are dropped from the page cache first, so its load reads
   the disk.
A background process samples the GPU (NVML: utilisation, memory) every second throughout.
Reported: the lmm stage's model load (its build: tokenizer, weights straight to the GPU; and the
loader's call alone); launch to the first lmm batch and to the first committed shard; per size,
the job's images/h over its lmm batches after the job's first (which also compiles), each batch
counted from the end of the one before it, so gaps count, against the bench's images/h; over
the whole job, images/h and GPU utilisation from the first batch's start (and end) to the last's
end, and end to end (launch to exit).
--time-limit S: skip or cut phases so that the whole stays within S seconds (partial results
are kept in OUT/results.json; a cut job's end-to-end figure is marked as such). On one H200 the
default sequence takes about 590 s (checkpoint 60, bench 140, job 375 + Ray's stop).
--table RESULTS.json prints the tables of a saved run again.
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


def checkpoint(work: Path, tiny: bool, cmd: list[str], log: Path, timeout: float, env: dict, clear: tuple = ()) -> dict | None:
    """WORKDIR/ckpt as `cmd` writes it (its last output line: a JSON of timings), or as kept by an
    earlier call when WORKDIR/ckpt.json says it is complete and of the same kind; `clear`: other
    folders the writer fills, emptied first. None when the writer fails."""
    ckpt, done = work / "ckpt", work / "ckpt.json"
    if done.is_file() and json.loads(done.read_text()).get("tiny") == tiny:
        say(f"checkpoint: reusing {ckpt}")
        return json.loads(done.read_text()) | {"reused": True}
    say("checkpoint: building (random weights, released layout)")
    for d in (ckpt, *clear):
        shutil.rmtree(d, ignore_errors=True)
    done.unlink(missing_ok=True)
    rc, text = run(cmd, log, timeout, env)
    if rc:
        say(f"checkpoint: failed (rc {rc}):\n{text[-3000:]}")
        return None
    info = json.loads(text.strip().splitlines()[-1]) | {"tiny": tiny}
    done.write_text(json.dumps(info))
    say(f"checkpoint: {info}")
    return info


def run_job(cmd: list[str], log: Path, timeout: float, env: dict, events_path: Path) -> tuple[float, float, int, str, list[dict]]:
    """The job command, its stages' timed events written to `events_path`: (launch, end, rc, output, events)."""
    launch = time.time()
    rc, text = run(cmd, log, timeout, dict(env, GENFLEET_BENCH_EVENTS=str(events_path)))
    end = time.time()
    events = [json.loads(x) for x in events_path.read_text().splitlines()] if events_path.is_file() else []
    return launch, end, rc, text, events


def prompts(n: int, seed: int) -> list[str]:
    import random

    r = random.Random(seed)
    return [", ".join(r.sample(WORDS, r.randint(2, 4))) for _ in range(n)]


def write_manifest(path: Path, sizes: list[int], rows: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, list] = {"id": [], "task": [], "prompt": [], "width": [], "height": [], "seed": []}
    for size, n in zip(sizes, rows):
        cols["id"] += [f"t2i-{size}-{i:04d}" for i in range(n)]
        cols["prompt"] += prompts(n, size)
        cols["task"] += ["t2i"] * n
        cols["width"] += [size] * n
        cols["height"] += [size] * n
        cols["seed"] += list(range(n))
    pq.write_table(pa.table(cols), path)


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


def analyse(launch: float, end: float, events: list[dict], output: Path, samples, sizes: list[int]) -> dict:
    from pipeline.resume import read_results

    mine = [e for e in events if launch <= e["t0"] <= end]
    builds = {e["stage"]: e for e in mine if e["kind"] == "build"}
    lmm = sorted((e for e in mine if e["kind"] == "batch" and e["stage"] == "lmm"), key=lambda e: e["t0"])
    try:
        commits = sorted(c.result.committed_at for c in read_results(str(output)))
    except Exception:  # no commit (a job cut short)
        commits = []
    r: dict = {"wall_s": round(end - launch, 1), "lmm_batches": len(lmm), "images": sum(e["rows"] for e in lmm)}
    if "lmm" in builds:
        b = builds["lmm"]
        r["actor_start_s"] = round(b["t0"] - launch, 1)  # driver checks, Ray start, actor start, CUDA init
        r["model_load_s"] = round(b["t1"] - b["t0"], 1)
    weights = [e for e in mine if e["kind"] == "weights" and e["stage"] == "lmm" and e["what"] == "load_bagel"]
    if weights:
        w = weights[0]
        r["weights_load_s"] = round(w["t1"] - w["t0"], 1)
        r["weights_gb"] = round(w["bytes"] / 1e9, 2)
        r["weights_gb_s"] = round(w["bytes"] / 1e9 / max(w["t1"] - w["t0"], 1e-9), 2)
    if "vae_decode" in builds:
        r["ae_load_s"] = round(builds["vae_decode"]["t1"] - builds["vae_decode"]["t0"], 1)
    if commits:
        r["first_commit_s"] = round(commits[0] - launch, 1)
        r["commits"] = len(commits)
    r["iph_end_to_end"] = round(3600 * r["images"] / (end - launch), 1)
    if not lmm:
        return r
    t_first, t_first_end, t_last = lmm[0]["t0"], lmm[0]["t1"], lmm[-1]["t1"]
    r["first_batch_at_s"] = round(t_first - launch, 1)
    r["batches"] = [[round(e["t0"] - launch, 1), round(e["t1"] - e["t0"], 2), e["rows"], [s[0] for s in e["sizes"]]] for e in lmm]
    r["gaps_s"] = [round(b["t0"] - a["t1"], 2) for a, b in zip(lmm, lmm[1:])]
    r["iph_from_first"] = round(3600 * r["images"] / (t_last - t_first), 1)
    r["util_from_first"] = mean_util(samples, t_first, t_last)
    r["util_after_first"] = mean_util(samples, t_first_end, t_last) if len(lmm) > 1 else None
    r["per_size"] = {}
    for size in sizes:  # batches of this size alone, after the job's first; each from the end of the one before
        spans = [(a["t1"], b["t1"], b["rows"]) for a, b in zip(lmm, lmm[1:]) if b["sizes"] == [[size, size]]]
        if spans:
            us = [u for t, u, _ in samples if any(t0 <= t <= t1 for t0, t1, _ in spans)]
            r["per_size"][str(size)] = {
                "batches": len(spans), "images": sum(n for *_, n in spans),
                "iph": round(3600 * sum(n for *_, n in spans) / sum(t1 - t0 for t0, t1, _ in spans), 1),
                "util": round(sum(us) / len(us), 1) if us else None}
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
    ap.add_argument("--table", type=Path, default=None, help="print the tables of a saved results.json and exit")
    ap.add_argument("--sample-gpu", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return 0
    if args.sample_gpu:
        sample_gpu(args.sample_gpu, 1.0)
        return 0
    tiny = args.tiny
    sizes = args.sizes or ([64, 32] if tiny else [1024, 512])
    rows = args.rows or ([4, 8] if tiny else [16, 64])[: len(sizes)]
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
    results: dict = {"device": None, "sizes": sizes, "rows": rows, "batch": batch, "steps": steps, "bench": {}}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    try:
        import torch

        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else "cpu"
        say(f"{results['device']}, torch {torch.__version__}; workdir {work} ({shutil.disk_usage(work).free / 2**30:.0f} GiB free)")
        ckpt = work / "ckpt"
        info = checkpoint(work, tiny, [sys.executable, "bench/bagel_checkpoint.py", str(ckpt), *(["--tiny"] if tiny else [])],
                          log, left(), env)
        if info is None:
            return 1
        results["checkpoint"] = info
        save()
        from bagel_checkpoint import drop_cache

        if not args.no_bench and left() > (60 if tiny else 100):
            say(f"bench: sizes {sizes}, batch {batch}")
            cmd = [sys.executable, "bench/bench_bagel.py", "--sizes", *map(str, sizes), "--batch-sizes", str(batch), "--steps", str(steps),
                   "--attention", "split", "--no-edit", *(["--tiny"] if tiny else ["--compile"])]
            rc, text = run(cmd, log, left() - 10, env)
            results["bench"] = {str(size): bench_figure(text, size, batch) for size in sizes}
            say(f"bench: rc {rc}, images/h {results['bench']}\n{text[-1500:]}")
            save()
        if left() < (60 if tiny else 150):
            say(f"job: skipped ({left():.0f}s left)")
            return 1
        manifest, output = work / "manifest.parquet", work / "out"
        write_manifest(manifest, sizes, rows)
        shutil.rmtree(output, ignore_errors=True)
        for f in ("ema.safetensors", "ae.safetensors"):
            drop_cache(ckpt / f)
        sets = [f"stages.lmm.batch_size={batch}", f"sampler.t2i.num_timesteps={steps}"]
        if tiny:
            sets += ["stages.lmm.options.compile=false", "ray.num_cpus=4"]
        cmd = [sys.executable, "-m", "jobs.cli", "run", "configs/bagel-7b-job.yaml", "--family", "bench.bagel_timed:FAMILY",
               "--model", str(ckpt), "--manifest", str(manifest), "--output", str(output),
               *(["--cpu"] if tiny else []), *[a for s in sets for a in ("--set", s)]]
        say(f"job: {' + '.join(f'{n} rows at {size}²' for size, n in zip(sizes, rows))}, batch {batch}, {steps} steps")
        launch, end, rc, text, events = run_job(cmd, log, left() - 5, env, events_path)
        r = analyse(launch, end, events, output, read_samples(gpu_csv), sizes) | {"rc": rc, "rows": sum(rows)}
        for size, d in r.get("per_size", {}).items():
            if results["bench"].get(size):
                d["ratio"] = round(d["iph"] / results["bench"][size], 3)
        results["job"] = r
        save()
        say(f"job: rc {rc}; {json.dumps(r)}\n{text[-1500:]}")
    finally:
        os.killpg(sampler.pid, signal.SIGTERM)
        sampler.wait()
        save()
        print_table(results)
    return 0


def print_table(results: dict) -> None:
    g = lambda d, k: "–" if d.get(k) is None else d[k]  # noqa: E731
    print(f"\n# BAGEL job vs bench: {results['device']}, batch {results['batch']}, {results['steps']} steps; "
          f"checkpoint {results.get('checkpoint')}")
    r = results.get("job")
    if not r:
        print(f"# no job figures; bench images/h {results['bench']}")
        return
    print(f"# job: {r['images']}/{r['rows']} images, rc {r['rc']}, wall {r['wall_s']} s; lmm batches [start s, s, rows, sizes] "
          f"{r.get('batches')}; gaps {r.get('gaps_s')} s; actor start {g(r, 'actor_start_s')} s\n")
    print("| size | job batches (after the job's first) | bench images/h | job images/h | job / bench | GPU util % |")
    print("|---|---|---|---|---|---|")
    for size, d in r.get("per_size", {}).items():
        print(f"| {size}² | {d['batches']} ({d['images']} images) | {g(results['bench'], size)} | {d['iph']} | {g(d, 'ratio')} "
              f"| {g(d, 'util')} |")
    print("\n| job | figure |\n|---|---|")
    for label, key in (("lmm model load (stage build: tokenizer, weights, compile set-up), s", "model_load_s"),
                       ("  of it load_bagel (weights to the GPU), s", "weights_load_s"), ("  weights GB", "weights_gb"),
                       ("  weights GB/s", "weights_gb_s"), ("AE load (vae_decode build), s", "ae_load_s"),
                       ("launch -> lmm build starts (checks, Ray, actor, CUDA), s", "actor_start_s"),
                       ("launch -> first lmm batch starts, s", "first_batch_at_s"), ("launch -> first committed shard, s", "first_commit_s"),
                       ("images/h, first batch start -> last batch end", "iph_from_first"),
                       ("images/h, end to end" + (f" (run cut: rc {r['rc']}, {r['images']} of {r['rows']} images)" if r["rc"] else ""),
                        "iph_end_to_end"),
                       ("GPU util %, first batch start -> last batch end", "util_from_first"),
                       ("GPU util %, first batch end -> last batch end", "util_after_first"), ("commits", "commits")):
        print(f"| {label} | {g(r, key)} |")


if __name__ == "__main__":
    sys.exit(main())
