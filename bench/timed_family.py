"""A family with each stage's model build and batch call timed, for the job benches
(bench/bench_bagel_job.py, bench/bench_emu_job.py).

    TimedFamily(base, [Loader(module, "load_x", bytes_of), ...])

Everything is the base family's (tasks, params, stages, checks); only each stage's build
(model load) and each batch call are wrapped: when the environment variable
GENFLEET_BENCH_EVENTS names a file, one JSON line per event is appended to it (`stage`, `kind`
build|weights|batch, wall-clock `t0`/`t1`, `rows`, `sizes`, `pid`). `weights`: a call of one of
the given loader functions inside a build (to the stage's device, synchronised), `what` its
name, `bytes` what `bytes_of(*args)` says it read. Loaders are patched on their module for the
length of a build, so a stage must look them up there when it builds (`from M import f`
inside the build, or `M.f`). Local Ray's workers inherit the driver's environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pipeline.family import StageContext, StageSpec

EVENTS_ENV = "GENFLEET_BENCH_EVENTS"


@dataclasses.dataclass(frozen=True)
class Loader:
    module: ModuleType
    name: str  # a function of `module` that reads weights
    bytes_of: Callable[..., int]  # its call's arguments -> bytes it reads


def log_event(record: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as f:  # one short line per write: appends from several processes stay whole
            f.write(json.dumps(record) + "\n")


def _sizes(samples) -> list:
    return sorted({tuple(s.state.size) for s in samples if getattr(s.state, "size", None)})


def _timed_loader(orig: Callable, loader: Loader, stage: str) -> Callable:
    def load(*args, **kwargs):
        import torch

        t0 = time.time()
        out = orig(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        log_event({"stage": stage, "kind": "weights", "what": loader.name, "t0": t0, "t1": time.time(),
                   "bytes": loader.bytes_of(*args, **kwargs), "pid": os.getpid()})
        return out

    return load


def _timed_build(build, stage: str, loaders: tuple[Loader, ...], ctx: StageContext):
    t0 = time.time()
    originals = [(ld, getattr(ld.module, ld.name)) for ld in loaders]
    for ld, orig in originals:
        setattr(ld.module, ld.name, _timed_loader(orig, ld, stage))
    try:
        fn = build(ctx)
    finally:
        for ld, orig in originals:
            setattr(ld.module, ld.name, orig)
    log_event({"stage": stage, "kind": "build", "t0": t0, "t1": time.time(), "device": ctx.device, "pid": os.getpid()})

    def run(samples):
        t = time.time()
        out = fn(samples)
        log_event({"stage": stage, "kind": "batch", "t0": t, "t1": time.time(), "rows": len(samples),
                   "sizes": _sizes(samples), "pid": os.getpid()})
        return out

    return run


class TimedFamily:
    def __init__(self, base: Any, loaders: list[Loader]):
        self._base = base
        self._loaders = tuple(loaders)
        self.name, self.tasks, self.scores = base.name, base.tasks, base.scores

    def stages(self, model: str) -> list[StageSpec]:
        return [dataclasses.replace(s, build=functools.partial(_timed_build, s.build, s.name, self._loaders))
                for s in self._base.stages(model)]

    def __getattr__(self, attr):  # check_model, model_name, model_fingerprint, write_tiny, demo
        return getattr(self._base, attr)
