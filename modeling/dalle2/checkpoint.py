"""Reading DALLE2 checkpoints safely and picking the weights and config out of them.

Formats: `{version, config, model}` (tracker "model only" saves), a bare state dict with the
train config in a separate JSON, trainer checkpoints (`ema_model` / `ema` weights are used),
and safetensors (config, if any, in the metadata under "config").
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from packaging.version import Version
from torch import Tensor

ALLOWED_GLOBALS = [Version]


def read_checkpoint(path: str | Path) -> dict:
    """weights_only unpickling with packaging's Version allowed; anything else is refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        out: dict = {"model": sd}
        if "config" in meta:
            out["config"] = json.loads(meta["config"])
        return out
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:  # memory-mapped: only the tensors a stage keeps are read from disk
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        hint = next((l for l in first if "GLOBAL" in l or "Unsupported" in l), first[0] if first else "")
        raise ValueError(
            f"{path}: refused to unpickle ({hint.strip()}); only tensors, plain containers and "
            "packaging.version.Version may appear in a checkpoint (torch.load weights_only=True)"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint is a {type(obj).__name__}, expected a dict")
    return obj


def checkpoint_version(obj: dict) -> Version | None:
    """The dalle2-pytorch version a checkpoint was saved with, if it says."""
    v = obj.get("version") if isinstance(obj, dict) else None
    if v is None or isinstance(v, Tensor):
        return None
    try:
        return Version(str(v))
    except Exception:  # noqa: BLE001 - an unparsable version is treated as unknown
        return None


def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, Tensor) for v in d.values())


def _strip(d: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def split_checkpoint(obj: dict, kind: str) -> tuple[dict[str, Tensor], dict | None, str]:
    """-> (state dict in the reference layout, config section or None, format name). kind: prior|decoder."""
    if kind not in ("prior", "decoder"):
        raise ValueError(f"kind must be prior or decoder, got {kind!r}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    section = None
    if config is not None:
        section = config.get(kind)
        if section is None:
            raise ValueError(f"checkpoint config has no {kind!r} section (keys: {sorted(config)})")
    if _is_state_dict(obj.get("ema_model")):  # prior trainer
        return obj["ema_model"], section, "trainer-ema"
    if isinstance(obj.get("ema"), dict) and obj["ema"]:
        ema = obj["ema"]
        if kind == "prior" and any(k.startswith("ema_model.") for k in ema):
            return _strip(ema, "ema_model."), section, "trainer-ema"
        if kind == "decoder":
            sd = {}
            for k, v in ema.items():
                m = re.match(r"(\d+)\.ema_model\.(.+)", k)
                if m:
                    sd[f"unets.{m.group(1)}.{m.group(2)}"] = v
            if sd:
                model = obj.get("model") if _is_state_dict(obj.get("model")) else {}
                extra = {k: v for k, v in model.items() if not k.startswith("unets.")}
                return {**extra, **sd}, section, "trainer-ema"
        raise ValueError(f"checkpoint has 'ema' but no EMA {kind} weights in it")
    if _is_state_dict(obj.get("model")):
        return obj["model"], section, "model+config" if section is not None else "model"
    if _is_state_dict(obj):
        return obj, None, "state_dict"
    raise ValueError(f"unrecognised {kind} checkpoint (top-level keys: {sorted(obj)[:10]})")


def config_section(train_config: dict, kind: str) -> dict:
    """The prior/decoder part of a TrainDiffusionPriorConfig / TrainDecoderConfig (or a bare section)."""
    if kind in train_config:
        return train_config[kind]
    marker = "net" if kind == "prior" else "unets"
    if marker in train_config:
        return train_config
    raise ValueError(f"config has no {kind!r} section (keys: {sorted(train_config)})")
