"""Load a DALLE2 stack from a dalle2-laion model config JSON.

Files are read through fsspec. A `url` file with a `cache_dir` is kept there; it is fetched
again when its checksum file's text changes, and a fetched file that does not match its
checksum (LFS pointer `oid sha256:` / bare sha256 / the file itself) is an error.
Relative local paths and cache dirs are taken relative to the config file's directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from .checkpoint import checkpoint_version, config_section, read_checkpoint, split_checkpoint
from .config import File, ModelLoadConfig
from .decoder import DecoderParams
from .models import build_decoder, build_prior, decoder_from_unets, decoder_params_for

log = logging.getLogger(__name__)


def _read_text(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path, checksum: str, same_file: bool = False) -> None:
    """Raise ValueError when `path` does not match `checksum` (when the checksum can say)."""
    m = re.search(r"oid sha256:([0-9a-f]{64})", checksum)
    size = re.search(r"^size (\d+)$", checksum, re.M)
    bare = re.fullmatch(r"\s*([0-9a-fA-F]{64})\s*", checksum)
    want = m.group(1) if m else bare.group(1).lower() if bare else None
    if want is not None:
        got = _sha256(path)
        if got != want or (size and int(size.group(1)) != path.stat().st_size):
            raise ValueError(f"{path}: checksum mismatch (sha256 {got}, checksum file says {want})")
    elif same_file and path.read_bytes().decode("utf-8", errors="replace") != checksum:
        raise ValueError(f"{path}: checksum mismatch (content differs from its checksum file)")


def _download(f: File, dest: Path, checksum: str | None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".part")
    try:
        with os.fdopen(fd, "wb") as out, fsspec.open(f.path, "rb") as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        if checksum is not None:
            verify_checksum(Path(tmp), checksum, same_file=f.checksum_file_path == f.path)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if checksum is not None:
        Path(str(dest) + ".checksum").write_text(checksum)


def resolve_file(f: File, base_dir: str | Path = ".", check_update: bool = True) -> Path:
    """A local path for `f`, downloading (and caching) url files."""
    base = Path(base_dir)
    if f.load_type == "local":
        p = Path(f.path.removeprefix("file://")).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise FileNotFoundError(f"local file {p} does not exist")
        return p
    checksum = _read_text(f.checksum_file_path) if f.checksum_file_path else None
    if f.cache_dir is None:
        dest = Path(tempfile.mkdtemp(prefix="dalle2-")) / f.filename
        _download(f, dest, checksum)
        return dest
    cache = Path(f.cache_dir).expanduser()
    dest = (cache if cache.is_absolute() else base / cache) / f.filename
    cached_ck = Path(str(dest) + ".checksum")
    if not dest.exists():
        log.info("fetching %s -> %s", f.path, dest)
        _download(f, dest, checksum)
    elif checksum is not None and check_update:
        old = cached_ck.read_text() if cached_ck.exists() else None
        if old != checksum:
            log.info("checksum of %s changed: fetching again", f.path)
            _download(f, dest, checksum)
    return dest


@dataclass
class Stack:
    """What a model config resolves to (each part loaded on demand)."""

    config: ModelLoadConfig
    base_dir: Path

    @classmethod
    def from_json(cls, path: str | Path) -> Stack:
        path = Path(path)
        return cls(ModelLoadConfig.from_json(path), path.parent)

    def _section(self, model_file: File, config_file: File | None, kind: str, weights: bool = True):
        if not weights and config_file is not None:  # settings only: skip the (large) weights file
            return {}, config_section(json.loads(resolve_file(config_file, self.base_dir).read_text()), kind), None
        obj = read_checkpoint(resolve_file(model_file, self.base_dir))
        sd, section, fmt = split_checkpoint(obj, kind)
        if section is None:
            if config_file is None:
                raise ValueError(f"{kind} checkpoint {model_file.path} ({fmt}) has no config: set load_config_from")
            text = resolve_file(config_file, self.base_dir).read_text()
            section = config_section(json.loads(text), kind)
        return sd, section, checkpoint_version(obj)

    def prior(self, *, dtype=torch.float32, device="cpu"):
        pc = self.config.prior
        if pc is None:
            raise ValueError("model config has no prior")
        sd, section, version = self._section(pc.load_model_from, pc.load_config_from, "prior")
        return build_prior(section, sd, version=version, dtype=dtype, device=device,
                           sample_timesteps=pc.default_sample_timesteps)

    def decoder_params(self) -> DecoderParams:
        """Per-unet settings assembled across unet sources (reads configs, builds nothing)."""
        return self.decoder(unet_numbers=[], params_only=True)

    def decoder(self, unet_numbers: list[int] | None = None, *, dtype=torch.float32, device="cpu",
                params_only: bool = False):
        dc = self.config.decoder
        if dc is None:
            raise ValueError("model config has no decoder")
        n = dc.num_unets
        wanted = list(range(1, n + 1)) if unet_numbers is None else list(unet_numbers)
        per: dict[int, tuple[DecoderParams, int, object]] = {}
        for src in dc.unet_sources:
            mine = [u for u in src.unet_numbers if u in wanted] if not params_only else []
            sd, section, version = self._section(src.load_model_from, src.load_config_from, "decoder",
                                                 weights=bool(mine))
            p = decoder_params_for(section, sd, version)
            model = build_decoder(section, sd, mine, version=version, dtype=dtype, device=device) if mine else None
            for j, u in enumerate(src.unet_numbers):
                if u > len(p.unets):
                    raise ValueError(f"unet source {src.load_model_from.path} has {len(p.unets)} unets, not {u}")
                if src.default_sample_timesteps is not None:
                    p.sample_timesteps[u - 1] = src.default_sample_timesteps[j]
                per[u] = (p, u - 1, model)
        for u in range(2, n + 1):
            (pa, ia, _), (pb, ib, _) = per[u - 1], per[u]
            if ib == 0 or pb.image_sizes[ib - 1] != pa.image_sizes[ia]:
                got = None if ib == 0 else pb.image_sizes[ib - 1]
                raise ValueError(f"image sizes do not chain: unet {u - 1} makes {pa.image_sizes[ia]}², "
                                 f"unet {u} was trained to upsample from {got}")
            if pb.timesteps != pa.timesteps:
                raise ValueError(f"unets {u - 1} and {u} were trained with {pa.timesteps} vs {pb.timesteps} timesteps")
        pick = lambda name: [getattr(per[u][0], name)[per[u][1]] for u in range(1, n + 1)]
        first = per[1][0]
        params = DecoderParams(
            unets=pick("unets"), image_sizes=pick("image_sizes"), timesteps=first.timesteps,
            beta_schedule=pick("beta_schedule"), learned_variance=pick("learned_variance"),
            predict_x_start=pick("predict_x_start"), predict_v=pick("predict_v"),
            sample_timesteps=pick("sample_timesteps"), use_noise_for_lowres_cond=pick("use_noise_for_lowres_cond"),
            lowres_noise_sample_level=first.lowres_noise_sample_level,
            image_cond_drop_prob=first.image_cond_drop_prob, text_cond_drop_prob=first.text_cond_drop_prob,
            clip_denoised=first.clip_denoised, use_dynamic_thres=first.use_dynamic_thres,
            dynamic_thres_percentile=first.dynamic_thres_percentile, ddim_sampling_eta=first.ddim_sampling_eta,
            channels=first.channels)
        if params_only:
            return params
        unets = [per[u][2].unets[per[u][1]] if u in wanted else None for u in range(1, n + 1)]
        return decoder_from_unets(params, unets)

    def default_cond_scales(self) -> tuple[float | None, list[float | None]]:
        """(prior default, per-unet decoder defaults) from the config."""
        prior = self.config.prior.default_cond_scale if self.config.prior else None
        dec = []
        if self.config.decoder:
            for u in range(1, self.config.decoder.num_unets + 1):
                src = self.config.decoder.source_of(u)
                dec.append(src.default_cond_scale[src.unet_numbers.index(u)] if src.default_cond_scale else None)
        return prior, dec

    def clip(self, *, dtype=torch.float32, device="cpu"):
        from .clip import OPENAI_MODELS, load_clip

        cc = self.config.clip
        if cc is None:
            raise ValueError("model config has no clip")
        name = cc.model
        if name not in OPENAI_MODELS and not name.startswith(("/", "~")) and (self.base_dir / name).exists():
            name = str(self.base_dir / name)
        return load_clip(name, dtype=dtype, device=device)
