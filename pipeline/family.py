"""The contract between the runner and a model family.

A family says which tasks it serves, how a row's sampler parameters are checked,
and which stages turn a validated row into outputs. The runner knows nothing else
about it: it places each stage on an actor pool (GPU stages) or CPU tasks, feeds
them batches of row dicts and isolates rows that fail.

Row dicts entering the first stage carry (all set by the runner):
    id, sample_index, task, prompt, negative_prompt (str | None),
    seed (job or row seed), sample_seed (int: the only source of randomness for
    this sample; build a torch.Generator from it), width, height (int | None),
    image, mask (bytes | str URL | None: fetch with pipeline.inputs.load_image),
    params (dict: the family's sampler defaults merged with the row's overrides).
A stage returns one dict per input row (same order) holding the fields it adds or
replaces; anything picklable may travel between stages (numpy arrays, tensors on
CPU). The last stage leaves, for the sink:
    pixels: uint8 numpy array (H, W, 3)  -> encoded to PNG/WebP/JPEG on CPU
    embeddings: dict[str, float array]     -> OUTPUT/embeddings/ (1-D: one size per
                                              model; N-D: stored with its shape)
    text: str                              -> OUTPUT/texts/ (e.g. an answer, or a plan beside an image)
A stage that raises for a batch has it retried row by row; the rows that still
raise go to OUTPUT/errors/ with the stage name and the exception's type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

Row = dict[str, Any]
BatchFn = Callable[[list[Row]], list[Row]]


class RowError(ValueError):
    """A problem with one row's input: the row goes to errors under `kind`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class StageContext:
    """What a stage's builder gets inside its actor (or task) when it starts."""

    model_path: str  # local directory (or file) of the model, as given in the job
    device: str  # "cuda", "cuda:1", "cpu": where the runner placed this stage
    dtype: str  # "float32", "bfloat16", "float16"
    options: dict[str, Any] = field(default_factory=dict)  # the stage's free options


@dataclass(frozen=True)
class StageSpec:
    """One step of a family's pipeline; `build` loads models once per actor."""

    name: str
    build: Callable[[StageContext], BatchFn]
    uses_gpu: bool = True
    default_batch_size: int = 1


class Family(Protocol):
    name: str
    tasks: frozenset[str]  # which of t2i / edit / variation / understand it serves

    def stages(self, model_path: str) -> list[StageSpec]:
        """The stages in pipeline order (they may depend on the model, e.g. its
        number of upsamplers; read only small config files here)."""

    def params_for(self, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """The row's sampler parameters: the family's defaults for `task` with
        `overrides` (job sampler settings, then the row's `params`) applied.
        Raises RowError("bad_params", ...) for unknown keys or bad values."""

    def model_name(self, model_path: str) -> str:
        """A short name of the model (written into every output row)."""

    def model_fingerprint(self, model_path: str) -> str:
        """Changes whenever the model would produce other outputs (configs,
        weight file names and sizes): resuming over a changed model is refused."""
