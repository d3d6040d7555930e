"""The job's optional `score` stage: quality scores any family's images can get
(`scores: {clip: {model: DIR}}` in the spec), computed after the family's last stage on
the decoded pixels and the row's prompt, before encoding.

It runs as a stage like the family's (pipeline/stages.py: per-sample errors, a raising
batch split, transient failures retried), in its own actor pool. A sample without
pixels or without a prompt passes with a null score. The model directory is checked
here before Ray starts, and its fingerprint joins the job's output fingerprint.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.family import Family, ModelError, StageContext, StageFn, directory_fingerprint
from pipeline.progress import Report
from pipeline.rows import map_samples
from pipeline.sample import Result, RowError, Sample
from pipeline.spec import ClipScoreConfig, JobSpec, SpecError
from pipeline.stages import StageRunner, loaded, run_reported

STAGE = "score"
CLIP_COLUMN = "clip_score"
COLUMNS = {CLIP_COLUMN: "float32"}  # the columns of images/ the score stage can write
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # their contents join the fingerprint (weights: name and size)


def check_clip_model(directory: str) -> None:
    """Raise ModelError (one line, naming the file) unless `directory` is a transformers CLIP
    checkpoint with safetensors weights, an image processor config and a tokenizer."""
    root = Path(directory)
    where = f"scores.clip.model {directory}"
    if not root.is_dir():
        raise ModelError(f"{where}: not a directory (a transformers CLIPModel checkpoint directory)")
    config = root / "config.json"
    if not config.is_file():
        raise ModelError(f"{where}: missing config.json")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{where}: config.json does not parse: {e}") from None
    if model_type != "clip":
        raise ModelError(f"{where}: config.json has model_type {model_type!r}, not 'clip'")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"{where}: model.safetensors.index.json does not parse: {e}") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise ModelError(f"{where}: missing {missing[0]} (named by model.safetensors.index.json)")
    elif not (root / "model.safetensors").is_file():
        bin_note = " (pytorch_model.bin is not loaded: only safetensors are)" if (root / "pytorch_model.bin").exists() else ""
        raise ModelError(f"{where}: missing model.safetensors{bin_note}")
    if not (root / "preprocessor_config.json").is_file() and not (root / "processor_config.json").is_file():
        raise ModelError(f"{where}: missing preprocessor_config.json")
    if not (root / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            if not (root / name).is_file():
                raise ModelError(f"{where}: missing {name} (or tokenizer.json)")


def clip_fingerprint(directory: str) -> str:
    """Every file's name and size, and the contents of the configs and tokenizer files, and of
    weights small enough to read at every start (under 64 MiB: two tiny CLIPs of one shape differ)."""
    return directory_fingerprint(directory, (*CONFIG_SUFFIXES, ".safetensors"))


def build_clip(ctx: StageContext) -> StageFn:
    """The clip_score stage function: one batched pass over the samples that have both an
    image and a prompt; the others get no score (a null in images/)."""
    import torch

    from modeling.clip_score import ClipScorer

    scorer = ClipScorer.load(ctx.model_path, device=ctx.device, dtype=getattr(torch, ctx.dtype))

    def run(samples: list[Sample]) -> list[Result | RowError]:
        scored = [(i, s.outputs.pixels, s.prompt) for i, s in enumerate(samples) if s.outputs.pixels is not None and s.prompt and s.prompt.strip()]
        values = scorer.score([p for _, p, _ in scored], [t for _, _, t in scored])
        by_index = dict(zip((i for i, _, _ in scored), values.tolist()))
        # state passes through unchanged: the score stage is not the family's to end
        return [Result(state=s.state, scores={CLIP_COLUMN: by_index[i]} if i in by_index else None) for i, s in enumerate(samples)]

    return run


class ScoreStage:
    """The batch function of the score actor pool (Ray-free: jobs/driver.py places it)."""

    def __init__(self, ctx: StageContext, attempts: int = 3, report: Report | None = None):
        """`report`: where this replica says how far it is (pipeline/progress.py), or nowhere."""
        self.report = report
        self.runner = loaded(STAGE, partial(StageRunner, "", STAGE, ctx, attempts=attempts, build=build_clip), report)

    def __call__(self, block: pa.Table) -> pa.Table:
        return map_samples(block, self.run)

    def run(self, samples: list[Sample]) -> None:
        run_reported(self.runner, samples, self.report)


def check_scores(spec: JobSpec, family: Family, stage_names: list[str]) -> dict[str, Any]:
    """Before Ray starts: the scorers' models and names. Returns their part of the output
    fingerprint (model fingerprint and placement), {} for a job without scores."""
    c = spec.scores.clip
    if c is None:
        return {}
    if STAGE in stage_names or CLIP_COLUMN in family.scores:
        raise SpecError(f"scores.clip: family {family.name} has its own {STAGE!r} stage or {CLIP_COLUMN!r} score")
    check_clip_model(c.model)
    return {"clip": {"model": clip_fingerprint(c.model), "device": c.resolved_device, "dtype": c.dtype}}


def score_columns(spec: JobSpec) -> dict[str, str]:
    """The images/ columns this job's scores write: name -> kind (pipeline/sink.py)."""
    return dict(COLUMNS) if spec.scores.clip is not None else {}


def score_context(c: ClipScoreConfig) -> StageContext:
    """Where the score stage runs: the CLIP directory, its device and dtype."""
    return StageContext(c.model, c.resolved_device, c.dtype)
