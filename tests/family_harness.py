"""Run a family's stages over samples in this process, as the runner's actors would
(pipeline.stages.StageRunner), for family tests that need no Ray."""

from __future__ import annotations

from pipeline.families import get_family
from pipeline.family import StageContext, parse_params
from pipeline.sample import Sample


def make_sample(family: str, task: str, *, sample_seed: int, params: dict | None = None, inputs: dict | None = None,
                row_id: str | None = None, **fields) -> Sample:
    spec = get_family(family).tasks[task]
    return Sample(id=row_id or f"{task}-{sample_seed}", sample_index=0, task=task, sample_seed=sample_seed,
                  params=parse_params(spec.params, params or {}), inputs=dict(inputs or {}),
                  **{"prompt": "a red cube on a table", **fields})


class Stages:
    """A family's stages built once (as in an actor), run in order over lists of samples."""

    def __init__(self, family: str, model: str, options: dict | None = None, dtype: str = "float32"):
        from pipeline.stages import StageRunner

        specs = get_family(family).stages(model)
        last_reader = max((i for i, s in enumerate(specs) if s.reads_inputs), default=-1)
        ctx = StageContext(model, "cpu", dtype, dict(options or {}))
        self.runners = [StageRunner(family, s.name, ctx, keep_inputs=i < last_reader) for i, s in enumerate(specs)]

    def __call__(self, samples: list[Sample]) -> list[Sample]:
        import copy

        samples = copy.deepcopy(samples)
        for runner in self.runners:
            runner.run(samples)
        return samples
