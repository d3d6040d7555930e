"""Load a DALLE2 stack from a dalle2-laion model config JSON.

Files are read through fsspec. A `url` file with a `cache_dir` is kept there; it is fetched
again when its checksum file's text changes or the cached copy no longer matches what was
fetched. A fetched file that does not match its checksum (LFS pointer `oid sha256:` / bare
sha256 / the file itself), or a checksum file that says none of these, is an error unless the
entry says `"checksum": "skip"`. A checksum file that cannot be read (offline) leaves an intact
cached copy, verified when it was fetched, in use. Without a `cache_dir` the copy lives only
while it is read. `fetch=False` (resolve_file, Stack) reads url files only from their cache,
never from the network: for loaders whose files were fetched beforehand, once, elsewhere.
Relative local paths and cache dirs are taken relative to the config file's directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from .checkpoint import checkpoint_version, config_section, read_checkpoint, split_checkpoint
from .config import File, ModelLoadConfig
from .decoder import DecoderParams
from .models import build_decoder, build_prior, decoder_from_unets, decoder_params_for

log = logging.getLogger(__name__)


class ChecksumError(ValueError):
    """A url file whose checksum cannot be read or does not match (one line, naming the files)."""


class FetchError(OSError):
    """A url file that cannot be fetched (one line: its URL and why)."""


class NotCachedError(FileNotFoundError):
    """A url file read with fetch=False that has no intact copy in its cache."""


def fetch_failure(e: BaseException) -> str:
    """Why a fetch failed, in one line. fsspec's HTTP files raise FileNotFoundError(url) from what
    happened (an HTTP status, a refused connection, a failed DNS lookup): that is the cause told."""
    while e.__cause__ is not None:
        e = e.__cause__
    status = getattr(e, "status", None)
    if isinstance(status, int):  # aiohttp's ClientResponseError
        return f"HTTP {status} {getattr(e, 'message', '') or ''}".strip()
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_text(url: str) -> str:
    with fsspec.open(url, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_of(f: File) -> str | None:
    """The text of `f`'s checksum file; None when it has none or says `"checksum": "skip"`."""
    if f.checksum == "skip" or not f.checksum_file_path:
        return None
    try:
        return _read_text(f.checksum_file_path)
    except Exception as e:  # noqa: BLE001 - fsspec and aiohttp raise many kinds: fetch_failure says which
        raise ChecksumError(f"checksum file {f.checksum_file_path} of {f.path} cannot be read ({fetch_failure(e)}); "
                            "set \"checksum\": \"skip\" on that file entry to load it unchecked") from None


def verify_checksum(path: Path, checksum: str, source: str = "its checksum file", digest: str | None = None,
                    name: str | None = None) -> None:
    """Raise ChecksumError unless `path` matches `checksum`, the text of the file `source`: a git-lfs pointer
    (`oid sha256:`, `size`), a sha256 (alone or as sha256sum prints it), or the file's own content (dalle2-laion's
    configs, Hugging Face's raw/ of a file kept outside LFS). Anything else (empty, an HTML error page) is an
    error rather than a model loaded unchecked. `digest`: the file's sha256 when the caller has it; `name`: what
    the message calls the file (a download's URL rather than its temporary file)."""
    m = re.search(r"oid sha256:([0-9a-f]{64})", checksum) or re.fullmatch(r"\s*([0-9a-fA-F]{64})(?:\s+\S.*)?\s*", checksum)
    size = re.search(r"^size (\d+)$", checksum, re.M)
    if m:
        want, got = m.group(1).lower(), digest or _sha256(path)
        if got != want or (size and int(size.group(1)) != path.stat().st_size):
            raise ChecksumError(f"{name or path}: checksum mismatch (sha256 {got}, {source} says {want})")
        return
    # a file that is its own checksum: only worth comparing when the sizes can agree (4 bytes per replaced char)
    if checksum.strip() and path.stat().st_size <= 4 * len(checksum) and path.read_bytes().decode("utf-8", errors="replace") == checksum:
        return
    head = " ".join(checksum.split())[:60]
    raise ChecksumError(f"{source}: unreadable checksum for {name or path.name} ({'empty' if not head else f'starts {head!r}'}; "
                        "expected a git-lfs pointer, a sha256 or the file itself); "
                        "set \"checksum\": \"skip\" on that file entry to load it unchecked")


def _record(dest: Path) -> Path:
    return Path(str(dest) + ".sha256")


def _download(f: File, dest: Path, checksum: str | None) -> None:
    """Fetch `f` to `dest` through a temporary file, verified before it takes the name. Records the sha256 and
    size of what was fetched beside it, which later uses check the cached copy against."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with fsspec.open(f.path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
            except Exception as e:  # noqa: BLE001 - fsspec and aiohttp raise many kinds: fetch_failure says which
                raise FetchError(f"{f.path} cannot be fetched ({fetch_failure(e)})") from None
        if checksum is not None:
            verify_checksum(Path(tmp), checksum, source=f"checksum file {f.checksum_file_path}", digest=h.hexdigest(), name=f.path)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _record(dest).write_text(f"{h.hexdigest()} {dest.stat().st_size}\n")
    if checksum is not None:
        Path(str(dest) + ".checksum").write_text(checksum)


def _cached_copy_intact(dest: Path) -> bool:
    """Whether `dest` still holds what was fetched (its recorded sha256 and size). It is hashed again on every
    use, not trusted on size and mtime: those are easy to keep while changing the bytes (touch -r), and the
    loader reads the whole file right after, from the page cache this warms. The size goes first: a
    truncated copy costs no read."""
    try:
        digest, size = _record(dest).read_text().split()
    except (OSError, ValueError):
        return False  # no record (a copy from before records, or put there by hand): fetch it again
    return dest.stat().st_size == int(size) and _sha256(dest) == digest


def local_path(f: File, base_dir: str | Path = ".") -> Path:
    """Where a `local` file entry points: a path (or file:// URL), relative ones under `base_dir`."""
    p = Path(f.path.removeprefix("file://")).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def cache_path(f: File, base_dir: str | Path = ".") -> Path:
    """Where a `url` file entry with a cache_dir is kept."""
    assert f.cache_dir is not None
    cache = Path(f.cache_dir).expanduser()
    return (cache if cache.is_absolute() else Path(base_dir) / cache) / f.filename


def _cached_only(f: File, dest: Path) -> Path:
    """fetch=False: the cached copy, intact, or NotCachedError; no network."""
    if not dest.exists():
        raise NotCachedError(f"{f.path} is not in its cache ({dest}); it was not fetched before this load, "
                             "which reads url files only from their cache")
    if not _cached_copy_intact(dest):
        raise NotCachedError(f"{dest}: the cached copy of {f.path} is not what was fetched (changed, or not recorded); "
                             "this load reads url files only from their cache")
    return dest


def resolve_file(f: File, base_dir: str | Path = ".", check_update: bool = True, fetch: bool = True) -> Path:
    """A lasting local path for `f`: a local file, or a url file fetched into its `cache_dir` (url files without
    one: `local_copy`). fetch=False: a url file's intact cached copy, or NotCachedError."""
    if f.load_type == "local":
        p = local_path(f, base_dir)
        if not p.exists():
            raise FileNotFoundError(f"local file {p} does not exist")
        return p
    if f.cache_dir is None:
        raise ValueError(f"{f.path} has no cache_dir: use local_copy()")
    dest = cache_path(f, base_dir)
    if not fetch:
        return _cached_only(f, dest)
    cached_ck = Path(str(dest) + ".checksum")
    try:
        checksum = _checksum_of(f)
    except ChecksumError:
        # offline, or the checksum's host is down: a copy verified against it when fetched, still intact, serves
        if dest.exists() and cached_ck.exists() and _cached_copy_intact(dest):
            log.warning("checksum file %s cannot be read: using the cached %s, verified when it was fetched", f.checksum_file_path, dest)
            return dest
        raise
    if not dest.exists():
        log.info("fetching %s -> %s", f.path, dest)
        _download(f, dest, checksum)
    elif checksum is not None and check_update and (cached_ck.read_text() if cached_ck.exists() else None) != checksum:
        log.info("checksum of %s changed: fetching again", f.path)
        _download(f, dest, checksum)
    elif not _cached_copy_intact(dest):
        log.warning("cached %s is not what was fetched from %s: fetching again", dest, f.path)
        _download(f, dest, checksum)
    return dest


@contextmanager
def local_copy(f: File, base_dir: str | Path = ".", fetch: bool = True) -> Iterator[Path]:
    """A local path for `f` while the block runs. A url file without a cache_dir is fetched into a temporary
    directory removed on exit (tensors memory-mapped from it stay readable: the file goes only when unmapped);
    with fetch=False it has nowhere to be read from: NotCachedError."""
    if f.load_type == "url" and f.cache_dir is None:
        if not fetch:
            raise NotCachedError(f"{f.path} has no cache_dir, and this load reads url files only from their cache")
        with tempfile.TemporaryDirectory(prefix="dalle2-") as tmp:
            dest = Path(tmp) / f.filename
            _download(f, dest, _checksum_of(f))
            yield dest
    else:
        yield resolve_file(f, base_dir, fetch=fetch)


@dataclass
class Stack:
    """What a model config resolves to (each part loaded on demand)."""

    config: ModelLoadConfig
    base_dir: Path
    fetch: bool = True  # False: url files are read only from their cache (resolve_file)

    @classmethod
    def from_json(cls, path: str | Path, fetch: bool = True) -> Stack:
        path = Path(path)
        return cls(ModelLoadConfig.from_json(path), path.parent, fetch)

    def _text(self, f: File) -> str:
        with local_copy(f, self.base_dir, self.fetch) as path:
            return path.read_text()

    def _section(self, model_file: File, config_file: File | None, kind: str, weights: bool = True):
        if not weights and config_file is not None:  # settings only: skip the (large) weights file
            return {}, config_section(json.loads(self._text(config_file)), kind), None
        with local_copy(model_file, self.base_dir, self.fetch) as path:
            obj = read_checkpoint(path)
        sd, section, fmt = split_checkpoint(obj, kind)
        if section is None:
            if config_file is None:
                raise ValueError(f"{kind} checkpoint {model_file.path} ({fmt}) has no config: set load_config_from")
            section = config_section(json.loads(self._text(config_file)), kind)
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
