"""The BAGEL family, each stage's model build and batch timed, for bench/bench_bagel_job.py.

    genfleet run SPEC --family bench.bagel_timed:FAMILY     # with GENFLEET_BENCH_EVENTS=FILE

bench/timed_family.py says what is recorded; the loader calls timed are load_bagel (bytes:
ema.safetensors) and load_ae (ae.safetensors).
"""

from __future__ import annotations

from pathlib import Path

import modeling.bagel.load as L
from bench.timed_family import Loader, TimedFamily
from pipeline.families.bagel import FAMILY as BAGEL

FAMILY = TimedFamily(BAGEL, [
    Loader(L, "load_bagel", lambda ckpt_dir, *a, **k: L.weight_file(ckpt_dir).stat().st_size),
    Loader(L, "load_ae", lambda ckpt_dir, *a, **k: (Path(ckpt_dir) / "ae.safetensors").stat().st_size),
])
