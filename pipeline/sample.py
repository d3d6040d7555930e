"""A sample in flight: what the runner owns, what the family keeps, what comes out.

One manifest row expands into `num_samples` samples, each keyed (id, sample_index).
The runner fills the fields it owns and never reads `state`; a family's stages read
those fields and hand back, per sample, a `Result` (new state and outputs) or a
`RowError`. A row that fails validation becomes one sample with a negative
sample_index that carries only its failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RowError(Exception):
    """One sample (or row) cannot be made: it goes to errors under `kind`.

    `retryable`: the cause is outside the row (storage, network, memory): a later run
    tries it again instead of recording it as final."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.kind, self.retryable = kind, retryable


@dataclass(frozen=True)
class Failure:
    """Why a sample has no outputs, as written to OUTPUT/errors/."""

    stage: str
    kind: str
    message: str
    retryable: bool = False


@dataclass
class Outputs:
    """What a sample leaves for the sink (filled by the family's stages, then the encoder)."""

    pixels: np.ndarray | None = None  # uint8 [H, W, 3]; replaced by `image` when encoded
    image: bytes | None = None  # encoded PNG / WebP / JPEG
    image_size: tuple[int, int] | None = None  # (width, height) of `image`
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # -> OUTPUT/embeddings/
    text: str | None = None  # -> OUTPUT/texts/ (an answer, or the plan beside an image)
    scores: dict[str, float] = field(default_factory=dict)  # per-sample scores / flags, columns of images/


@dataclass
class Result:
    """A stage's result for one sample: the family state handed to the next stage
    (it replaces the previous one) and any outputs made here."""

    state: Any = None
    pixels: np.ndarray | None = None
    embeddings: dict[str, np.ndarray] | None = None
    text: str | None = None
    scores: dict[str, float] | None = None
    # the sampler params as this stage used them (unset ones resolved, e.g. from the model's config):
    # they replace the sample's, so the outputs' `sampler` records what made them
    params: Any = None


@dataclass
class Sample:
    id: str
    sample_index: int  # < 0: the record of a row that failed as a whole
    task: str
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int = 0  # the row's seed, or the job's
    sample_seed: int = 0  # the only source of this sample's randomness (see validate.sample_seed)
    width: int | None = None
    height: int | None = None
    params: Any = None  # the task's sampler parameters: an instance of its TaskSpec.params model
    inputs: dict[str, Any] = field(default_factory=dict)  # "image" -> bytes, "images" -> [bytes, ...]
    extras: dict[str, Any] = field(default_factory=dict)  # manifest columns carried to the outputs
    state: Any = None  # owned by the family; the runner never reads it
    outputs: Outputs = field(default_factory=Outputs)
    failure: Failure | None = None
    covers: int = 1  # manifest pairs this sample accounts for (a failed row stands for all its samples)
    ordinal: int = -1  # the manifest row's position (files in order, rows in order)
    content: int | None = None  # the row's content hash (keys.content_hashes): a resumed run reports rows edited since
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return self.id, self.sample_index

    def fail(self, stage: str, kind: str, message: str, retryable: bool = False) -> None:
        """Mark failed; later stages pass it by, and its state and outputs are dropped."""
        self.failure = Failure(stage, kind, message[:2000], retryable)
        self.state, self.inputs, self.outputs = None, {}, Outputs()

    def apply(self, result: Result) -> None:
        self.state = result.state
        if result.pixels is not None:
            self.outputs.pixels = result.pixels
        if result.embeddings:
            self.outputs.embeddings.update(result.embeddings)
        if result.text is not None:
            self.outputs.text = result.text
        if result.scores:
            self.outputs.scores.update(result.scores)
        if result.params is not None:
            self.params = result.params
