"""The Emu2-Gen family, each stage's model build and batch timed, for bench/bench_emu_job.py.

    genfleet run SPEC --family bench.emu_timed:FAMILY     # with GENFLEET_BENCH_EVENTS=FILE

bench/timed_family.py says what is recorded; the loader calls timed are load_encoder (bytes:
the multimodal encoder's shards) and load_decoder (the unet's and VAE's weight files).
"""

from __future__ import annotations

from pathlib import Path

import modeling.emu.decoder as D
import modeling.emu.load as L
from bench.timed_family import Loader, TimedFamily
from pipeline.families.emu import EMU2


def encoder_bytes(model_dir, *args, **kwargs) -> int:
    return sum(p.stat().st_size for p in set(L.emu2_shards(model_dir).values()))


def decoder_bytes(model_dir, variant, *args, **kwargs) -> int:
    return sum(D.weight_path(Path(model_dir), variant, kind).stat().st_size for kind in ("unet", "vae"))


FAMILY = TimedFamily(EMU2, [Loader(L, "load_encoder", encoder_bytes), Loader(D, "load_decoder", decoder_bytes)])
