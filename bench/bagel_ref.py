"""The BAGEL reference (ByteDance-Seed/Bagel's own InterleaveInferencer), timed in a subprocess.

bench_bagel.py --reference PATH calls `run_reference` (t2i) and, unless --no-edit,
`run_reference_edit` (bench/bagel_ref_edit.py) after its own figures, on the same GPU:
PATH is a copy of the reference's `modeling/`, `data/` and `inferencer.py`; `tools` is a copy of
shared/tools/bagel-ref (its bench.py, the flash-attn stand-in and the transformers-5 shims).
Nothing of the reference is imported here: it runs from its own copy, in its own process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF_LINE = re.compile(r"REF t2i (\d+)x\d+ steps=\d+ cfg_img=[\d.]+: ([\d.]+) s/image")
REF_EDIT_LINE = re.compile(r"REF edit (\d+)x\d+ steps=\d+: ([\d.]+) s/image")
NOISY = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm progress bars


def find_tools(path: str | None) -> Path:
    """The reference bench's folder: `path`, else .bagel-tools/ in the checkout, else ../shared/tools/bagel-ref."""
    options = [Path(path)] if path else [REPO / ".bagel-tools", REPO.parent / "shared" / "tools" / "bagel-ref"]
    for p in options:
        if (p / "bench.py").is_file():
            return p
    raise SystemExit(f"no reference bench (bench.py) in {', '.join(map(str, options))}")


def _run(cmd: list[str], ref: Path, pattern: re.Pattern) -> dict[int, float]:
    """Run one reference bench command, echoing its output; {size: s/image} from the lines `pattern` matches."""
    if not (ref / "inferencer.py").is_file() or not (ref / "modeling").is_dir():
        raise SystemExit(f"--reference {ref}: expected the reference's modeling/, data/ and inferencer.py there")
    env = dict(os.environ, BAGEL_REF=str(ref.resolve()), PYTHONUNBUFFERED="1")
    print(f"\n# reference: BAGEL_REF={ref} {' '.join(cmd[1:])}", flush=True)
    got: dict[int, float] = {}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):
                if part.strip() and not NOISY.search(part):
                    print(f"#   ref| {part}", flush=True)
                m = pattern.search(part)
                if m:
                    got[int(m.group(1))] = float(m.group(2))
    if proc.returncode:
        print(f"# reference bench exited with {proc.returncode}", flush=True)
    return got


def run_reference(ref: Path, tools: Path, sizes: list[int], steps: int, tiny: bool) -> dict[int, float]:
    """Run tools/bench.py over `ref` at `sizes` (t2i, batch 1, cfg_img 1); returns {size: s/image}."""
    cmd = [sys.executable, str(tools / "bench.py"), "--rows", *[f"{s}:{steps}:1.0" for s in sizes]]
    return _run(cmd + (["--tiny"] if tiny else []), ref, REF_LINE)


def run_reference_edit(ref: Path, tools: Path, size: int, steps: int, tiny: bool) -> dict[int, float]:
    """Run bench/bagel_ref_edit.py (the reference's edit of a size x size image, batch 1); {size: s/image}."""
    cmd = [sys.executable, str(Path(__file__).with_name("bagel_ref_edit.py")), "--tools", str(tools),
           "--size", str(size), "--steps", str(steps)]
    got = _run(cmd + (["--tiny"] if tiny else []), ref, REF_EDIT_LINE)
    return {size: s for s in got.values()}  # keyed by the input's size, as genfleet's edit row


def print_comparison(ours: dict[tuple[int, int, str], float], ref: dict[int, float], steps: int, task: str = "t2i") -> None:
    """ours: {(size, batch, attention): s/image}; ref: {size: s/image} at batch 1."""
    print(f"\n| {task} size | genfleet batch | attention | genfleet s/image | genfleet images/h | reference s/image (batch 1) "
          "| reference images/h | ratio (images/h genfleet / reference) |")
    print("|---|---|---|---|---|---|---|---|")
    for (size, batch, label), s in sorted(ours.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        r = ref.get(size)
        rs = f"{r:.2f} | {3600 / r:.0f} | {r / s:.2f}×" if r else "– | – | –"
        print(f"| {size}² | {batch} | {label} | {s:.2f} | {3600 / s:.0f} | {rs} |")
    settings = ("cfg_text 4, cfg_img 1, interval [0.4, 1]" if task == "t2i"
                else "cfg_text 4, cfg_img 2, interval [0, 1], text_channel renorm")
    print(f"# {task}: same process sequence, same GPU; {steps} steps, {settings} on both sides", flush=True)
