"""The BAGEL family, each stage's model build and batch timed, for bench/bench_bagel_job.py.

    genfleet run SPEC --family bench.bagel_timed:FAMILY     # with GENFLEET_BENCH_EVENTS=FILE

Everything is pipeline/families/bagel.py's (tasks, params, stages, loader, sampler, checks);
only each stage's build (model load) and each batch call are wrapped: when the environment
variable GENFLEET_BENCH_EVENTS names a file, one JSON line per event is appended to it
(`stage`, `kind` build|weights|batch, wall-clock `t0`/`t1`, `rows`, `sizes`, `pid`). `weights`: the
loader's load_bagel / load_ae calls inside a build (to the stage's device, synchronised), with the
file's bytes. Local Ray's workers inherit the driver's environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import modeling.bagel.load as L
from pipeline.families.bagel import FAMILY as BAGEL
from pipeline.family import StageContext, StageSpec

EVENTS_ENV = "GENFLEET_BENCH_EVENTS"


def _log(record: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(json.dumps(record) + "\n")


def _sizes(samples) -> list:
    return sorted({tuple(s.state.size) for s in samples if getattr(s.state, "size", None)})


def _timed_loader(orig, stage: str):
    def load(ckpt_dir, device="cpu", *args, **kwargs):
        import torch

        t0 = time.time()
        out = orig(ckpt_dir, device, *args, **kwargs)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        path = Path(ckpt_dir) / "ae.safetensors" if orig.__name__ == "load_ae" else L.weight_file(ckpt_dir)
        _log({"stage": stage, "kind": "weights", "what": orig.__name__, "t0": t0, "t1": time.time(), "device": str(device),
              "bytes": path.stat().st_size, "pid": os.getpid()})
        return out

    return load


def _timed_build(build, stage: str, ctx: StageContext):
    t0 = time.time()
    loaders = {name: getattr(L, name) for name in ("load_bagel", "load_ae")}
    for name, orig in loaders.items():
        setattr(L, name, _timed_loader(orig, stage))
    try:
        fn = build(ctx)
    finally:
        for name, orig in loaders.items():
            setattr(L, name, orig)
    _log({"stage": stage, "kind": "build", "t0": t0, "t1": time.time(), "device": ctx.device, "pid": os.getpid()})

    def run(samples):
        t = time.time()
        out = fn(samples)
        _log({"stage": stage, "kind": "batch", "t0": t, "t1": time.time(), "rows": len(samples),
              "sizes": _sizes(samples), "pid": os.getpid()})
        return out

    return run


class TimedBagel:
    name = BAGEL.name
    tasks = BAGEL.tasks
    scores = BAGEL.scores

    def stages(self, model: str) -> list[StageSpec]:
        return [dataclasses.replace(s, build=functools.partial(_timed_build, s.build, s.name)) for s in BAGEL.stages(model)]

    def __getattr__(self, attr):  # check_model, model_name, model_fingerprint, write_tiny, demo
        return getattr(BAGEL, attr)


FAMILY = TimedBagel()
