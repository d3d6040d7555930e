"""DALLE2-pytorch 1.15.6's own samplers, timed in subprocesses after genfleet's figures (bench_dalle2.py --reference).

The reference runs from the carried wheels (installed with `pip install --no-index --no-deps --target
SITE .dalle2-wheels/*.whl`) and shared/tools/dalle2-ref's import stubs, in its own processes:
its bench.py (prior + decoder unet 1) and bench/dalle2_ref_upsampler.py (unet 2).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PRIOR = re.compile(r"REF prior DDIM(\d+) \S+ B=(\d+): ([\d.]+) s")
DECODER = re.compile(r"REF decoder (\d+)px DDIM(\d+) \S+ B=(\d+) (\S+): ([\d.]+) s")
UPSAMPLER = re.compile(r"REF upsampler (\d+)px DDIM(\d+) B=(\d+) (\S+): ([\d.]+) s")
NOISY = re.compile(r"\d+%\||it/s\]|s/it\]|^\s*\d+it \[")  # tqdm progress bars


def find_tools(path: str | None) -> Path:
    """shared/tools/dalle2-ref as copied: `path`, else .dalle2-tools/ in the checkout, else ../shared/tools/dalle2-ref."""
    options = [Path(path)] if path else [REPO / ".dalle2-tools", REPO.parent / "shared" / "tools" / "dalle2-ref"]
    for p in options:
        if (p / "bench.py").is_file() and (p / "stubs").is_dir():
            return p
    raise SystemExit(f"no DALLE2 reference bench (bench.py, stubs/) in {', '.join(map(str, options))}")


def _run(cmd: list[str], site: str | None, tools: Path) -> list[str]:
    paths = ([site] if site else []) + [str(tools / "stubs")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    print(f"\n# reference: PYTHONPATH={env['PYTHONPATH']} {' '.join(cmd[1:])}", flush=True)
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):
                if part.strip() and not NOISY.search(part):
                    print(f"#   ref| {part}", flush=True)
                    lines.append(part)
    if proc.returncode:
        print(f"# reference exited with {proc.returncode}", flush=True)
    return lines


def run_prior_decoder(tools: Path, site: str | None, batches: list[int], steps: int, tiny: bool) -> dict[int, tuple]:
    """-> {batch: (prior s, decoder s, decoder precision)} from the reference's bench.py (fp16 autocast)."""
    cmd = [sys.executable, str(tools / "bench.py"), "--batch-sizes", ",".join(map(str, batches)), "--precision", "fp16",
           "--steps", str(steps)] + (["--tiny"] if tiny else [])
    prior, dec = {}, {}
    for line in _run(cmd, site, tools):
        if m := PRIOR.search(line):
            prior[int(m.group(2))] = float(m.group(3))
        if m := DECODER.search(line):
            dec[int(m.group(3))] = (float(m.group(5)), m.group(4))
    return {b: (prior[b], *dec[b]) for b in batches if b in prior and b in dec}


def run_upsampler(tools: Path, site: str | None, batches: list[int], steps: int, tiny: bool,
                  config: str | None) -> dict[int, tuple]:
    """-> {batch: (s, precision)} from bench/dalle2_ref_upsampler.py."""
    cmd = [sys.executable, str(HERE / "dalle2_ref_upsampler.py"), "--batch-sizes", ",".join(map(str, batches)),
           "--steps", str(steps)] + (["--tiny"] if tiny else []) + (["--upsampler-config", config] if config else [])
    got = {}
    for line in _run(cmd, site, tools):
        if m := UPSAMPLER.search(line):
            got[int(m.group(3))] = (float(m.group(5)), m.group(4))
    return got


def print_prior_decoder(ours: dict[int, tuple[float, float]], ref: dict[int, tuple], label: str) -> None:
    print(f"\n| batch | genfleet ({label}) prior s | decoder s | total s | images/h | reference prior s | decoder s "
          "| total s | images/h | ratio (images/h) | decoder alone: ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, (tp, td) in ours.items():
        mine = f"| {b} | {tp:.3f} | {td:.3f} | {tp + td:.3f} | {3600 * b / (tp + td):,.0f} "
        if b not in ref:
            print(mine + "| – | – | – | – | – | – |")
            continue
        rp, rd, prec = ref[b]
        print(mine + f"| {rp:.2f} | {rd:.2f} ({prec}) | {rp + rd:.2f} | {3600 * b / (rp + rd):,.0f} "
              f"| {(rp + rd) / (tp + td):.2f}× | {rd / td:.2f}× |")
    print("# reference prior: 1 candidate per prompt (its p_sample_loop); genfleet's: 2, reranked", flush=True)


def print_upsampler(ours: dict[int, float], ref: dict[int, tuple], label: str) -> None:
    print(f"\n| batch | genfleet ({label}) s | images/h | reference s | images/h | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, t in ours.items():
        r = ref.get(b)
        rs = f"{r[0]:.2f} ({r[1]}) | {3600 * b / r[0]:,.0f} | {r[0] / t:.2f}×" if r else "– | – | –"
        print(f"| {b} | {t:.3f} | {3600 * b / t:,.0f} | {rs} |", flush=True)
