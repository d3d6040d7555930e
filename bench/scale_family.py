"""A trivial CPU family for measuring the runner's machinery at scale (bench only).

`emit` returns a 4-float embedding drawn from the sample's seed: no model, no image, so
what is measured is reading, validation, the stage hand-offs, the sink and the commits.
"""

from __future__ import annotations

import numpy as np

from pipeline.family import Demo, Params, StageSpec, TaskSpec
from pipeline.sample import Result


def build_emit(ctx):
    def run(samples):
        return [Result(embeddings={"e": np.random.default_rng(s.sample_seed).random(4, dtype=np.float32)}) for s in samples]

    return run


class NoParams(Params):
    pass


class ScaleFamily:
    name = "scale"
    tasks = {"t2i": TaskSpec(NoParams)}
    scores: dict[str, str] = {}

    def stages(self, model):
        # model "actor": the stage in an actor pool, as model stages run; otherwise in the job's tasks
        return [StageSpec("emit", build_emit, num_gpus=0, num_cpus=1, batch_size=1024, resident=model == "actor")]

    def check_model(self, model):
        pass

    def model_name(self, model):
        return "scale"

    def model_fingerprint(self, model):
        return "scale"

    def write_tiny(self, directory):
        return str(directory)

    def demo(self):
        return Demo([{"id": "s0", "prompt": "x"}], [])


FAMILY = ScaleFamily()
