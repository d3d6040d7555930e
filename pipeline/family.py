"""The contract between the runner and a model family.

A family describes itself: its tasks (the inputs each needs, its sampler parameters as
a pydantic model whose defaults are the only ones), its stages in pipeline order with
their default resources, how to check a model path before anything loads, its demo
and a tiny random-weight model. The runner knows nothing else about it and never
names one: families are found through the registry (pipeline/families/).

A stage is built once per actor (`StageSpec.build(StageContext)`, models stay
resident) and then called with batches of samples. It returns, per sample and in
order, a `Result` (the family state for the next stage, and outputs) or a `RowError`
for that sample alone. A stage that resolves a parameter left unset (a default taken from
the model's config, a size taken from the row) returns the params as used in
`Result.params`, so that the outputs record the values that made them. If it raises instead, the runner re-runs the batch sample by
sample to find the ones that fail. The tests' toy family (tests/toy_family.py) is the
smallest complete example.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.sample import Result, RowError, Sample

StageFn = Callable[[list[Sample]], list["Result | RowError"]]


class ModelError(ValueError):
    """The model path lacks what the family needs; names the missing or bad file."""


class Params(BaseModel):
    """Base of a task's sampler parameters: unknown keys are refused, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def field_errors(e: ValidationError, prefix: str) -> str:
    return "; ".join(f"{'.'.join([prefix, *(str(p) for p in err['loc'])])}: {err['msg']}" for err in e.errors())


def parse_params(model: type[Params], values: Mapping[str, Any], prefix: str = "params") -> Params:
    """Validate sampler settings; a bad one is a RowError naming the field."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as e:
        raise RowError("bad_params", field_errors(e, prefix)) from None


@dataclass(frozen=True)
class InputSpec:
    """A manifest column holding input images: bytes, or a URL / path to fetch."""

    name: str  # "image", "mask", "images"
    required: bool = True
    many: bool = False  # a list of images (e.g. an interleaved prompt)


@dataclass(frozen=True)
class TaskSpec:
    params: type[Params]
    needs_prompt: bool = True
    inputs: tuple[InputSpec, ...] = ()


@dataclass(frozen=True)
class StageContext:
    """What a stage's builder gets inside its actor (or task) when it starts."""

    model_path: str  # the job's `model`, as given
    device: str  # "cuda", "cpu": where the runner placed this stage
    dtype: str  # "float32", "bfloat16", "float16"
    options: dict[str, Any] = field(default_factory=dict)  # the stage's free options from the spec


@dataclass(frozen=True)
class StageSpec:
    """One step of a family's pipeline, with its default placement."""

    name: str
    build: Callable[[StageContext], StageFn]
    num_gpus: float = 1.0  # per replica: 0 is a CPU stage, 2 spans two GPUs
    num_cpus: float = 0.5
    batch_size: int = 1
    reads_inputs: bool = False  # reads Sample.inputs (they are dropped after the last such stage)
    # False: a CPU stage with nothing worth keeping loaded (no model: a prompt rewrite, a filter): it
    # runs inside the job's CPU tasks, fused with reading and validation by Ray Data, built once per
    # worker process, in as many tasks at once as there are CPUs, with no actor and no hand-off of its
    # own. A job that sets its `replicas` (or gives it GPUs) runs it in an actor pool as other stages
    resident: bool = True


@dataclass(frozen=True)
class Demo:
    """`genfleet demo`: a small manifest and the settings that keep it quick on a CPU."""

    rows: list[dict[str, Any]]
    settings: list[str]  # --set KEY=VALUE overrides


class Family(Protocol):
    name: str
    tasks: Mapping[str, TaskSpec]
    scores: Mapping[str, str]  # per-sample scores it may emit (columns of images/): name -> "float" | "float32" | "bool"

    def stages(self, model: str) -> list[StageSpec]:
        """The stages in pipeline order (they may depend on the model, e.g. its number of
        upsamplers; read only small config files here)."""
        ...

    def check_model(self, model: str) -> None:
        """Raise ModelError (one line, naming the file) unless `model` has the layout the
        family loads: configs present and parseable, weight files present. Loads no weights.
        The driver calls it before Ray starts: model files the family fetches (DALLE2's url
        files) are fetched and verified here, once, so that its stages only read them."""
        ...

    def model_name(self, model: str) -> str:
        """A short name of the model, written into every output row."""
        ...

    def model_fingerprint(self, model: str) -> str:
        """Changes whenever the model would make other outputs (configs, weight file names and
        sizes): resuming over a changed model is refused."""
        ...

    def write_tiny(self, directory: str) -> str:
        """Write a tiny random-weight model in the released layout; returns the job's `model`."""
        ...

    def demo(self) -> Demo:
        ...


def directory_fingerprint(directory: str, hashed_suffixes: tuple[str, ...], skip_suffixes: tuple[str, ...] = ()) -> str:
    """A model directory's identity: every file's path and size (hidden files and
    `skip_suffixes` aside), and the contents of the (small) files with `hashed_suffixes`:
    configs and tokenizers, which decide the outputs as much as the weights do."""
    root, h = Path(directory), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or f.suffix in skip_suffixes:
            continue
        size = f.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        if f.suffix in hashed_suffixes and size < 64 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]
