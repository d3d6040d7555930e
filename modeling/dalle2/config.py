"""dalle2-laion's model load config (ModelLoadConfig JSON), accepted unchanged and validated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class File(_Strict):
    load_type: Literal["local", "url"]
    path: str
    checksum_file_path: str | None = None
    cache_dir: str | None = None
    filename_override: str | None = None
    checksum: Literal["skip"] | None = None  # genfleet's: load this url file without a checksum, said explicitly

    @model_validator(mode="before")
    @classmethod
    def _hf_checksum(cls, v):
        # Hugging Face: the LFS pointer at raw/main/<path> is the checksum of resolve/main/<path>
        if (isinstance(v, dict) and v.get("load_type") == "url" and v.get("checksum_file_path") is None
                and v.get("checksum") != "skip"):
            path = v.get("path", "")
            if path.startswith("https://huggingface.co/") and "resolve/main/" in path:
                v = {**v, "checksum_file_path": path.replace("resolve/main/", "raw/main/")}
        return v

    @property
    def filename(self) -> str:
        if self.filename_override:
            return self.filename_override
        return self.path.rstrip("/").split("/")[-1].split("?")[0]


class SingleDecoderLoadConfig(_Strict):
    unet_numbers: list[int] = Field(min_length=1)
    default_sample_timesteps: list[int] | None = None
    default_cond_scale: list[float] | None = None
    load_model_from: File
    load_config_from: File | None = None

    @model_validator(mode="after")
    def _lengths(self):
        n = len(self.unet_numbers)
        for name in ("default_sample_timesteps", "default_cond_scale"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{name}={v} must have one entry per unet in unet_numbers={self.unet_numbers}")
        if any(s <= 0 for s in self.default_sample_timesteps or []):
            raise ValueError(f"default_sample_timesteps={self.default_sample_timesteps} must be positive")
        return self


class DecoderLoadConfig(_Strict):
    unet_sources: list[SingleDecoderLoadConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _numbers(self):
        nums = sorted(n for s in self.unet_sources for n in s.unet_numbers)
        if len(nums) != len(set(nums)):
            dup = sorted({n for n in nums if nums.count(n) > 1})
            raise ValueError(f"decoder unet numbers {dup} are given by more than one source")
        want = list(range(1, len(nums) + 1))
        if nums != want:
            missing = sorted(set(range(1, max(nums) + 1)) - set(nums))
            raise ValueError(f"decoder unet numbers must cover 1..N once; got {nums} (missing {missing or [1]})")
        return self

    @property
    def num_unets(self) -> int:
        return sum(len(s.unet_numbers) for s in self.unet_sources)

    def source_of(self, unet_number: int) -> SingleDecoderLoadConfig:
        return next(s for s in self.unet_sources if unet_number in s.unet_numbers)


class PriorLoadConfig(_Strict):
    default_sample_timesteps: int | None = Field(default=None, gt=0)
    default_cond_scale: float | None = None
    load_model_from: File
    load_config_from: File | None = None


class ClipConfig(_Strict):
    make: str = "openai"
    model: str = "ViT-L/14"
    base_model_kwargs: dict | None = None

    @model_validator(mode="after")
    def _make(self):
        if self.make != "openai":
            raise ValueError(f"clip make={self.make!r} is not supported (only 'openai', loaded with transformers)")
        return self


class ModelLoadConfig(_Strict):
    decoder: DecoderLoadConfig | None = None
    prior: PriorLoadConfig | None = None
    clip: ClipConfig | None = None
    devices: list[str] | str = "cuda:0"  # accepted; the runner places stages
    load_on_cpu: bool = True
    strict_loading: bool = True  # accepted; loading is always strict

    def files(self) -> list[File]:
        """Every File entry: the prior's, then each unet source's (model, then config)."""
        sources = [*([self.prior] if self.prior else []), *(self.decoder.unet_sources if self.decoder else [])]
        return [f for s in sources for f in (s.load_model_from, s.load_config_from) if f is not None]

    @classmethod
    def from_json(cls, path: str | Path) -> ModelLoadConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.model_validate(data)
