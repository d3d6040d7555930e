"""A real Emu2-Gen job through `genfleet run`, against bench/bench_emu.py in the same process sequence.

    python bench/bench_emu_job.py --tokenizer-model TOK        # one H200: 32 rows at 1024², batch 8
    python bench/bench_emu_job.py --tiny                       # the same path on CPU, tiny model

Phases, each a fresh process, each printed with its start time:
1. checkpoint: bench/emu_checkpoint.py writes a random-weight Emu2-Gen folder in the released
   layout to WORKDIR/ckpt (kept if WORKDIR/ckpt.json says it is complete). Encoder shards that
   would fill the disk go to --spill (default /dev/shm/genfleet-emu-ckpt), linked from the folder.
2. bench: bench/bench_emu.py's t2i at the job's batch (`--models emu2 --no-ar --ar-steps graph`,
   the same tokenizer model).
3. job: `genfleet run` (`python -m jobs.cli run`) with configs/emu2-job.yaml over one t2i
   manifest of ROWS rows (bench_emu.py's prompts), the family being bench/emu_timed.py (emu2,
   its stage builds and batches timestamped). The checkpoint's disk pages are dropped from the
   page cache first, so its load reads the disk (spilled shards are in RAM by construction).
A background process samples the GPU (NVML: utilisation, memory) every second throughout.
Reported: each GPU stage's model load (its build, and the loader's call alone, with bytes and
where they were read from); launch to the first lmm batch and to the first committed shard;
the job's images/h over its batches after its first (the lmm, unet and vae_decode of a batch run
one after another in one actor; each batch is counted from the end of the one before it, so
gaps count) against the bench's; GPU utilisation from the first batch's start (and end) to the
last's end; end to end. --time-limit S keeps the whole within S seconds (partial results are
kept in OUT/results.json). --table RESULTS.json prints the tables of a saved run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bagel_job import checkpoint, mean_util, read_samples, run, run_job, say  # noqa: E402  (bench/, beside this file)

GPU_STAGES = ("lmm", "unet", "vae_decode")
BENCH_LINE = re.compile(r"# emu2 t2i genfleet step=\S+ batch=(\d+): ([\d.]+) s -> ([\d,.]+) images/h")


def write_manifest(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench_emu import rows_for

    pq.write_table(pa.table({"id": [f"t2i-{i:04d}" for i in range(rows)], "task": ["t2i"] * rows,
                             "prompt": rows_for(rows), "seed": list(range(rows))}), path)


def bench_figure(text: str, batch: int) -> float | None:
    """images/hour of the bench's genfleet t2i line at `batch`."""
    for m in BENCH_LINE.finditer(text):
        if int(m.group(1)) == batch:
            return float(m.group(3).replace(",", ""))
    return None


def analyse(launch: float, end: float, events: list[dict], output: Path, samples, checkpoint: dict) -> dict:
    from pipeline.resume import read_results

    mine = [e for e in events if launch <= e["t0"] <= end]
    builds = {e["stage"]: e for e in mine if e["kind"] == "build"}
    batches = {s: sorted((e for e in mine if e["kind"] == "batch" and e["stage"] == s), key=lambda e: e["t0"]) for s in GPU_STAGES}
    try:
        commits = sorted(c.result.committed_at for c in read_results(str(output)))
    except Exception:  # no commit (a job cut short)
        commits = []
    done = batches["vae_decode"]
    r: dict = {"wall_s": round(end - launch, 1), "batches": len(done), "images": sum(e["rows"] for e in done)}
    for stage in GPU_STAGES:
        if stage in builds:
            r[f"{stage}_build_s"] = round(builds[stage]["t1"] - builds[stage]["t0"], 1)
            r[f"{stage}_build_at_s"] = round(builds[stage]["t0"] - launch, 1)
    for w in (e for e in mine if e["kind"] == "weights"):
        secs = w["t1"] - w["t0"]
        r[w["what"]] = {"s": round(secs, 1), "gb": round(w["bytes"] / 1e9, 2), "gb_s": round(w["bytes"] / 1e9 / max(secs, 1e-9), 2)}
    if "load_encoder" in r:  # where its bytes were: the disk, or spilled to RAM
        r["load_encoder"] |= {"from_disk_gb": round(checkpoint["encoder_disk_bytes"] / 1e9, 2),
                              "from_ram_gb": round(checkpoint["encoder_spill_bytes"] / 1e9, 2)}
    if commits:
        r["first_commit_s"] = round(commits[0] - launch, 1)
        r["commits"] = len(commits)
    r["iph_end_to_end"] = round(3600 * r["images"] / (end - launch), 1)
    lmm = batches["lmm"]
    if not lmm or not done:
        return r
    t_first, t_first_end, t_last = lmm[0]["t0"], done[0]["t1"], done[-1]["t1"]
    r["first_batch_at_s"] = round(t_first - launch, 1)
    r["per_batch"] = [{s: round(b["t1"] - b["t0"], 2) for s, b in zip(GPU_STAGES, trio)} | {"rows": trio[-1]["rows"]}
                      for trio in zip(*(batches[s] for s in GPU_STAGES))]
    spans = [(a["t1"], b["t1"], b["rows"]) for a, b in zip(done, done[1:])]  # each batch from the end of the one before
    r["gaps_s"] = [round(b["t0"] - a["t1"], 2) for a, b in zip(done, lmm[1:])]
    r["iph_from_first"] = round(3600 * r["images"] / (t_last - t_first), 1)
    r["util_from_first"] = mean_util(samples, t_first, t_last)
    if spans:
        r["after_first"] = {"batches": len(spans), "images": sum(n for *_, n in spans),
                            "iph": round(3600 * sum(n for *_, n in spans) / sum(t1 - t0 for t0, t1, _ in spans), 1),
                            "util": mean_util(samples, t_first_end, t_last)}
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model, CPU, few steps (a smoke test of every phase)")
    ap.add_argument("--rows", type=int, default=None, help="manifest rows (default 32; tiny 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8; tiny 2")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; tiny 2)")
    ap.add_argument("--tokenizer-model", type=Path, default=None, help="LLaMA's tokenizer.model (default: a tiny trained one)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".emu-job")
    ap.add_argument("--spill", type=Path, default=Path("/dev/shm/genfleet-emu-ckpt"),
                    help="RAM folder for encoder shards that do not fit the disk ('' for none)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / ".emu-job" / "report"))
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole; later phases are cut or skipped")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--table", type=Path, default=None, help="print the tables of a saved results.json and exit")
    args = ap.parse_args(argv)
    if args.table:
        print_table(json.loads(args.table.read_text()))
        return 0
    tiny = args.tiny
    rows, batch, steps = args.rows or (4 if tiny else 32), args.batch_size or (2 if tiny else 8), args.steps or (2 if tiny else 50)
    limit = args.time_limit or float("inf")
    start = time.time()
    left = lambda: limit - (time.time() - start)  # noqa: E731
    work, out = args.workdir, args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log, gpu_csv, events_path = out / "log.txt", out / "gpu.csv", out / "events.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    sampler = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bench_bagel_job.py"), "--sample-gpu", str(gpu_csv)],
                               cwd=ROOT, start_new_session=True)
    results: dict = {"device": None, "rows": rows, "batch": batch, "steps": steps, "bench": None}
    tok = [] if args.tokenizer_model is None else ["--tokenizer-model", str(args.tokenizer_model.resolve())]

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    try:
        import torch

        results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else "cpu"
        spill = str(args.spill) if str(args.spill) and args.spill.parent.is_dir() else None
        disk = shutil.disk_usage(work)
        ram = shutil.disk_usage(args.spill.parent) if spill else None
        results["storage"] = {"disk_free_gb": round(disk.free / 1e9, 1),
                              "spill": spill, "spill_free_gb": round(ram.free / 1e9, 1) if ram else None}
        say(f"{results['device']}, torch {torch.__version__}; workdir {work}: {results['storage']}")
        ckpt = work / "ckpt"
        cmd = [sys.executable, "bench/emu_checkpoint.py", str(ckpt), *tok, *(["--spill", spill] if spill else []),
               *(["--tiny"] if tiny else [])]
        info = checkpoint(work, tiny, cmd, log, left(), env, clear=(Path(spill),) if spill else ())
        if info is None:
            return 1
        results["checkpoint"] = info
        save()
        from bagel_checkpoint import drop_cache

        if not args.no_bench and left() > (60 if tiny else 120):
            say(f"bench: t2i, batch {batch}, {steps} steps")
            cmd = [sys.executable, "bench/bench_emu.py", "--models", "emu2", "--no-ar", "--t2i-batch", str(batch),
                   "--steps", str(steps), *tok, *(["--tiny"] if tiny else ["--ar-steps", "graph"])]
            rc, text = run(cmd, log, left() - 10, env)
            results["bench"] = bench_figure(text, batch)
            say(f"bench: rc {rc}, images/h {results['bench']}\n{text[-1200:]}")
            save()
        if left() < (60 if tiny else 200):
            say(f"job: skipped ({left():.0f}s left)")
            return 1
        manifest, output = work / "manifest.parquet", work / "out"
        write_manifest(manifest, rows)
        shutil.rmtree(output, ignore_errors=True)
        for f in ckpt.rglob("*.safetensors"):
            if not f.is_symlink():
                drop_cache(f)
        sets = [f"stages.{s}.batch_size={batch}" for s in ("prepare", *GPU_STAGES)] + [f"sampler.t2i.num_inference_steps={steps}"]
        if tiny:
            sets += ["sampler.t2i.default_size=[64,64]", "ray.num_cpus=4"]
        cmd = [sys.executable, "-m", "jobs.cli", "run", "configs/emu2-job.yaml", "--family", "bench.emu_timed:FAMILY",
               "--model", str(ckpt), "--manifest", str(manifest), "--output", str(output),
               *(["--cpu"] if tiny else []), *[a for s in sets for a in ("--set", s)]]
        say(f"job: {rows} rows, batch {batch}, {steps} steps")
        launch, end, rc, text, events = run_job(cmd, log, left() - 5, env, events_path)
        r = analyse(launch, end, events, output, read_samples(gpu_csv), results["checkpoint"]) | {"rc": rc, "rows": rows}
        if results["bench"] and "after_first" in r:
            r["after_first"]["ratio"] = round(r["after_first"]["iph"] / results["bench"], 3)
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
    print(f"\n# Emu2-Gen job vs bench: {results['device']}, batch {results['batch']}, {results['steps']} steps; "
          f"storage {results.get('storage')}; checkpoint {results.get('checkpoint')}")
    r = results.get("job")
    if not r:
        print(f"# no job figures; bench images/h {results['bench']}")
        return
    print(f"# job: {r['images']}/{r['rows']} images, rc {r['rc']}, wall {r['wall_s']} s; per batch (s) {r.get('per_batch')}; "
          f"gaps {r.get('gaps_s')} s\n")
    a = r.get("after_first", {})
    print("| job batches counted (after the job's first) | bench images/h | job images/h | job / bench | GPU util % |")
    print("|---|---|---|---|---|")
    print(f"| {g(a, 'batches')} ({g(a, 'images')} images) | {g(results, 'bench')} | {g(a, 'iph')} | {g(a, 'ratio')} | {g(a, 'util')} |")
    print("\n| job | figure |\n|---|---|")
    for what in ("load_encoder", "load_decoder"):
        if what in r:
            print(f"| {what}: weights to the GPU | {r[what]} |")
    for label, key in (("lmm build (tokenizer, encoder weights, caches), s", "lmm_build_s"),
                       ("unet build (unet + VAE weights), s", "unet_build_s"), ("vae_decode build, s", "vae_decode_build_s"),
                       ("launch -> lmm build starts (checks, Ray, actor, CUDA), s", "lmm_build_at_s"),
                       ("launch -> first lmm batch starts, s", "first_batch_at_s"), ("launch -> first committed shard, s", "first_commit_s"),
                       ("images/h, first batch start -> last batch end", "iph_from_first"),
                       ("images/h, end to end" + (f" (run cut: rc {r['rc']})" if r["rc"] else ""), "iph_end_to_end"),
                       ("GPU util %, first batch start -> last batch end", "util_from_first"), ("commits", "commits")):
        print(f"| {label} | {g(r, key)} |")


if __name__ == "__main__":
    sys.exit(main())
