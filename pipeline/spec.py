"""The job spec: one validated object built from YAML, then CLI overrides."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


class SpecError(ValueError):
    """The job spec is invalid; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_replicas(v):
    if v is None:
        return v
    lo, hi = (v, v) if isinstance(v, int) else v
    if lo < 1 or hi < lo:
        raise ValueError(f"replicas must be >= 1 and min <= max, got {v}")
    return v


def _check_gpus(v):
    if v is not None and (v < 0 or (v > 1 and v != int(v))):
        raise ValueError(f"num_gpus must be a fraction <= 1 or a whole number, got {v}")
    return v


class StageConfig(_Strict):
    """Placement of one family stage. Unset fields take the family's defaults."""

    # a fixed pool size or (min, max) to autoscale; None: 1, or in the job's CPU tasks for a stage
    # that keeps no model (StageSpec.resident)
    replicas: int | tuple[int, int] | None = None
    num_gpus: float | None = None  # per replica; fractions share a GPU; None: the family's default
    num_cpus: float | None = Field(default=None, ge=0)  # None: the family's default (small: CPU work runs elsewhere)
    batch_size: int | None = Field(default=None, ge=1)
    dtype: Dtype | None = None  # None: bfloat16 on CUDA, float32 on CPU
    device: Literal["cuda", "cpu"] | None = None  # None: cuda when the stage has GPUs
    options: dict[str, Any] = Field(default_factory=dict)
    # run in the previous stage's actor (its replicas and resources apply)
    colocate: bool = False

    _replicas = field_validator("replicas")(_check_replicas)
    _gpus = field_validator("num_gpus")(_check_gpus)


class ClipScoreConfig(_Strict):
    """The CLIP score of each image and its prompt (pipeline/scoring.py), in its own actor pool
    after the family's last stage. Unlike a family stage its defaults are fixed here."""

    model: str  # a transformers CLIPModel checkpoint directory (safetensors, image processor, tokenizer)
    replicas: int | tuple[int, int] = 1
    num_gpus: float = 1.0  # 0: on CPU; a fraction shares a GPU
    num_cpus: float = Field(default=0.5, ge=0)
    batch_size: int = Field(default=32, ge=1)
    dtype: Dtype = "float32"  # float32 everywhere by default: scores comparable across devices and with torchmetrics
    device: Literal["cuda", "cpu"] | None = None  # None: cuda when it has GPUs

    _replicas = field_validator("replicas")(_check_replicas)
    _gpus = field_validator("num_gpus")(_check_gpus)

    @model_validator(mode="after")
    def _model(self):
        if not self.model.strip():
            raise ValueError("model must not be empty")
        return self

    @property
    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.num_gpus > 0 else "cpu")


class ScoresConfig(_Strict):
    """Quality scores added to images/ (one column each); unset ones are not computed."""

    clip: ClipScoreConfig | None = None


class OutputConfig(_Strict):
    image_format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(default=95, ge=1, le=100)  # webp / jpeg only
    webdataset: bool = False  # also write {key}.png/.json/.npy tar shards
    rows_per_shard: int = Field(default=1000, ge=1)
    # a shard is committed when it holds rows_per_shard samples or its oldest waited this long:
    # a crash loses at most about this much finished work per writer
    max_shard_seconds: float = Field(default=60.0, gt=0)


class InputsConfig(_Strict):
    """What input URLs a manifest may name (pipeline/policy.py), and how large inputs may be."""

    allow_local: list[str] = Field(default_factory=list)  # local roots (symlinks resolved)
    allow_urls: list[str] = Field(default_factory=list)  # URL prefixes besides the manifest's own bucket
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=64 * 1024 * 1024, ge=1)


class ErrorsConfig(_Strict):
    max_rate: float = Field(default=0.2, gt=0, le=1)  # stop the job when more fail (1: never stop)
    window: int = Field(default=1000, ge=1)  # ... over this many most recent samples
    attempts: int = Field(default=3, ge=1, le=20)  # tries of a transient failure within a run


class RayConfig(_Strict):
    address: str | None = None  # an existing cluster ("auto", "ray://..."); None starts one
    num_cpus: int | None = None  # for a local start
    num_gpus: float | None = None  # for a local start; may declare GPUs a CPU box lacks


class ManifestConfig(_Strict):
    """Where the manifest is, and which of its columns stand for the runner's (`manifest: URL`
    is short for `manifest: {path: URL}`)."""

    path: str  # a file, directory/prefix or glob (any fsspec URL)
    # the runner's or the family's column name -> the manifest's column that holds it, as
    # img2dataset's --caption_col: {prompt: caption}
    columns: dict[str, str] = Field(default_factory=dict)


class JobSpec(_Strict):
    family: str
    model: str
    manifest: ManifestConfig
    output: str
    seed: int = Field(default=0, ge=0)
    sampler: dict[str, Any] = Field(default_factory=dict)  # overrides the family's defaults
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    output_options: OutputConfig = Field(default_factory=OutputConfig, alias="outputs")
    ray: RayConfig = Field(default_factory=RayConfig)
    errors: ErrorsConfig = Field(default_factory=ErrorsConfig)
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    max_prompt_chars: int = Field(default=4000, ge=1)
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    cpu: bool = False  # every stage (and scorer) on CPU, whatever its config says: trying a job on a laptop

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _paths(self):
        for name, value in (("model", self.model), ("manifest", self.manifest.path), ("output", self.output)):
            if not value.strip():
                raise ValueError(f"{name} must not be empty")
        return self

    @model_validator(mode="after")
    def _on_cpu(self):
        if self.cpu and self.scores.clip is not None:
            self.scores.clip = self.scores.clip.model_copy(update={"num_gpus": 0.0, "device": "cpu"})
        return self

    def stage(self, name: str) -> StageConfig:
        cfg = self.stages.get(name) or StageConfig()
        return cfg.model_copy(update={"num_gpus": 0.0, "device": "cpu"}) if self.cpu else cfg

    def output_fingerprint(self, model_fingerprint: str, placement: dict[str, dict], scores: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything that changes the bytes of the outputs (and nothing else:
        replicas and batch sizes do not). Stored with the job to guard resumes.
        `placement`: each stage's resolved device, dtype and options. `scores`: each scorer's
        model fingerprint and placement; only present when the job has scores, so that jobs
        without them keep the fingerprint they had."""
        return {
            "family": self.family,
            "model": model_fingerprint,
            "seed": self.seed,
            "sampler": self.sampler,
            "stages": placement,
            "image_format": self.output_options.image_format,
            "quality": self.output_options.quality,
            "max_prompt_chars": self.max_prompt_chars,
            **({"scores": scores} if scores else {}),
            # which manifest columns are the prompts, ids, ...: only present when mapped, as scores
            **({"manifest_columns": self.manifest.columns} if self.manifest.columns else {}),
            # the images table's layout: an output of a version that wrote `image` as plain bytes
            # is not resumed into (its files and the new ones would not read as one table)
            "image_column": "hf_image",
        }


# a mapping that a plain string stands for: `manifest: URL` is `manifest: {path: URL}`
SHORTHANDS = {"manifest": "path"}


def _expand_shorthands(data: dict) -> None:
    """Before any flag or --set applies, so that `--set manifest.columns.prompt=caption` has a
    mapping to set into."""
    for key, field in SHORTHANDS.items():
        if isinstance(data.get(key), str):
            data[key] = {field: data[key]}


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    if dotted in SHORTHANDS and isinstance(value, str):  # `--manifest URL` sets the path and keeps the spec's columns
        dotted = f"{dotted}.{SHORTHANDS[dotted]}"
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SpecError(f"--set {dotted}: {k} is not a mapping")
    node[keys[-1]] = value


def dated_output(output: str) -> str:
    """`{date}` in an output becomes today's UTC date (YYYY-MM-DD): one output per night. It is
    the only placeholder; any other `{...}` is an error rather than a directory of that name."""
    for m in _PLACEHOLDER.finditer(output):
        if m.group(0) != "{date}":
            raise SpecError(f"output: {m.group(0)} in {output!r} is not a placeholder genfleet knows (only {{date}}, today's UTC date)")
    return output.replace("{date}", datetime.now(UTC).date().isoformat())


def load_spec(path: str | None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> JobSpec:
    """YAML (optional) < explicit flags < --set KEY=VALUE (values parsed as YAML); then `{date}`
    in the output is replaced (`dated_output`)."""
    data: dict[str, Any] = {}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"cannot read job spec {path}: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"job spec {path} must be a mapping, got {type(data).__name__}")
    _expand_shorthands(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(data, k, v)
    for item in sets or []:
        if "=" not in item:
            raise SpecError(f"--set {item.strip()!r}: a setting needs KEY=VALUE, e.g. --set {item.strip() or 'seed'}=VALUE")
        k, v = item.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    if isinstance(data.get("output"), str):
        data["output"] = dated_output(data["output"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '(spec)'}: {err['msg']}" for err in e.errors()]
        raise SpecError("invalid job spec: " + "; ".join(lines)) from None
