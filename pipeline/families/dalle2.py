"""DALLE2 (LAION release / DALLE2-pytorch) as a genfleet family.

The model path is a dalle2-laion model config JSON. Tasks: t2i, variation (CLIP image
embedding -> decoder), edit (text-guided RePaint inpainting; mask white = repaint).
Stages, in order (the model stages each able to sit on its own GPU actor):
    prepare      CPU: input image / mask decoding and resizing
    prior        CLIP text (+ image) encoding, prior sampling with reranking
    decoder      unet 1
    upsamplerK   unet K (K = 2..N, read from the config)
Params left at None take the model config's defaults (default_sample_timesteps,
default_cond_scale), then the checkpoint config's; steps with none of them run the full
schedule and scales default to 1, as in the reference (modeling/dalle2/sampling.py).
The stages record the values they used in the sample's params (images/ `sampler`):
prior_steps and prior_cond_scale, and decoder_steps / decoder_cond_scale one per unet.
Stage options (decoder / upsampler stages): channels_last, compile (torch.compile the unet).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from pipeline.demo_images import PROMPTS, demo_png
from pipeline.family import Demo, InputSpec, ModelError, Params, StageContext, StageSpec, TaskSpec
from pipeline.sample import Result, RowError, Sample

Steps = Annotated[int, Field(strict=True, ge=1, le=10000)]
Scale = Annotated[float, Field(strict=True, ge=0.0, le=100.0)]
Eta = Annotated[float, Field(strict=True, ge=0.0, le=10.0)]


class VariationParams(Params):
    decoder_steps: Steps | list[Steps | None] | None = None  # one value, or one per unet
    decoder_cond_scale: Scale | list[Scale | None] | None = None
    decoder_eta: Eta = 0.0
    lowres_noise_level: Annotated[float, Field(strict=True, ge=0.0, le=0.999)] | None = None


class T2IParams(VariationParams):
    prior_steps: Steps | None = None
    prior_cond_scale: Scale | None = None
    prior_eta: Eta = 1.0
    num_samples_per_batch: Annotated[int, Field(strict=True, ge=1, le=64)] = 2  # prior candidates, reranked by CLIP


class EditParams(T2IParams):
    inpaint_resample_times: Annotated[int, Field(strict=True, ge=1, le=100)] = 5


@dataclass(frozen=True)
class Dalle2State:
    source: Any = None  # variation: the decoded input image (PIL), for CLIP
    inpaint_image: np.ndarray | None = None  # edit: uint8 [S, S, 3]
    inpaint_mask: np.ndarray | None = None  # edit: bool [S, S], True = keep
    text_encodings: np.ndarray | None = None
    image_embed: np.ndarray | None = None
    image: np.ndarray | None = None  # the previous unet's output


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _setup(ctx: StageContext) -> None:
    if ctx.device == "cpu":
        torch.set_flush_denormal(True)  # random/tiny weights underflow into denormals: 20x slower on CPU


def _generator(sample_seed: int, salt: str) -> torch.Generator:
    """Each model of the stack draws from its own stream of the sample's seed."""
    h = hashlib.sha256(f"{sample_seed}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def _groups(indices, key) -> dict[Any, list[int]]:
    """Indices grouped by key(index), in order: samples sharing sampler settings run as one batch."""
    out: dict[Any, list[int]] = {}
    for i in indices:
        out.setdefault(key(i), []).append(i)
    return out


def _per_unet(v, n: int, i: int, key: str):
    if isinstance(v, list):
        if len(v) != n:
            raise RowError("bad_params", f"{key} has {len(v)} entries; this model has {n} unets")
        return v[i]
    return v


def _with_unet(v, n: int, i: int, value) -> list:
    """A per-unet param with unet i's entry set to the value it used (the other entries as given)."""
    entries = list(v) if isinstance(v, list) else [v] * n
    entries[i] = value
    return entries


def _square(img, size: int, resample):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), resample if s != size else Image.Resampling.NEAREST)


def _isolated(fn, samples: list[Sample]) -> list[Result | RowError]:
    out: list[Result | RowError] = []
    for s in samples:
        try:
            out.append(fn(s))
        except RowError as e:
            out.append(e)
    return out


# ---- stages ------------------------------------------------------------------------------
def from_cache(build):
    """A stage builder that reads url files only from their cache (Stack fetch=False): `check_model` filled it,
    in the driver, before Ray started, so a stage never downloads. One missing there fails the stage naming it."""

    @functools.wraps(build)
    def built(ctx: StageContext):
        from modeling.dalle2.load import NotCachedError

        try:
            return build(ctx)
        except NotCachedError as e:
            raise NotCachedError(f"{e}: genfleet fetches url files in the driver before Ray starts; on a cluster, "
                                 "give them a cache_dir on storage every node reads") from None

    return built


@from_cache
def build_prepare(ctx: StageContext):
    """CPU: input image / mask decoding and resizing, outside the GPU actors."""
    from PIL import Image

    from modeling.dalle2.load import Stack
    from pipeline.inputs import decode_image

    final = Stack.from_json(ctx.model_path, fetch=False).decoder_params().image_sizes[-1]

    def prepare(s: Sample) -> Result:
        if s.negative_prompt:
            raise RowError("bad_params", "dalle2 does not support negative_prompt")
        for side in ("width", "height"):
            if getattr(s, side) not in (None, final):
                raise RowError("bad_params", f"dalle2 makes {final}x{final} images; {side}={getattr(s, side)}")
        if s.task == "variation":
            return Result(Dalle2State(source=decode_image(s.inputs.get("image"))))
        if s.task == "edit":
            image, mask = decode_image(s.inputs.get("image")), decode_image(s.inputs.get("mask"), mode="L")
            if mask.size != image.size:
                raise RowError("bad_mask", f"mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}: "
                               "they must be the same size")
            img, mask = _square(image, final, Image.Resampling.BICUBIC), _square(mask, final, Image.Resampling.NEAREST)
            return Result(Dalle2State(inpaint_image=np.asarray(img, dtype=np.uint8),
                                      inpaint_mask=np.asarray(mask) < 128))  # True = keep (not painted)
        return Result(Dalle2State())

    return lambda samples: _isolated(prepare, samples)


@from_cache
def build_prior(ctx: StageContext):
    from modeling.dalle2.load import Stack
    from modeling.dalle2.sampling import per_sample_noise, sample_prior

    _setup(ctx)
    stack, device, dtype = Stack.from_json(ctx.model_path, fetch=False), ctx.device, _dtype(ctx.dtype)
    clip = stack.clip(dtype=dtype, device=device)
    prior: Any = stack.prior(dtype=dtype, device=device) if stack.config.prior else None
    default_scale = stack.default_cond_scales()[0]

    @torch.no_grad()
    def run(samples: list[Sample]) -> list[Result | RowError]:
        ids = clip.tokenize([s.prompt or "" for s in samples])
        text_embed, text_enc = clip.embed_text(ids)
        image_embed = torch.zeros_like(text_embed)
        failed: dict[int, RowError] = {}
        var = [i for i, s in enumerate(samples) if s.task == "variation"]
        if var:
            image_embed[var] = clip.embed_image(clip.preprocess([samples[i].state.source for i in var]).to(device))
        gen = [i for i, s in enumerate(samples) if s.task in ("t2i", "edit")]
        if gen and prior is None:
            failed.update({i: RowError("bad_params", "this model config has no prior: only variation rows can run") for i in gen})
            gen = []
        key = lambda i: (samples[i].params.prior_steps, samples[i].params.prior_cond_scale, samples[i].params.prior_eta,  # noqa: E731
                         samples[i].params.num_samples_per_batch)
        used: dict[int, Any] = {}  # the params as used, unset steps and scale resolved (recorded in images/)
        for (steps, scale, eta, n), idx in _groups(gen, key).items():
            noise = per_sample_noise([_generator(samples[i].sample_seed, "prior") for i in idx], device)
            scale = scale if scale is not None else default_scale if default_scale is not None else 1.0
            resolved = {"prior_steps": steps or prior.params.sample_timesteps or prior.params.timesteps, "prior_cond_scale": scale}
            used.update({i: samples[i].params.model_copy(update=resolved) for i in idx})
            try:
                image_embed[idx] = sample_prior(prior, text_embed[idx], text_enc[idx], noise, steps=steps,
                                                cond_scale=scale, eta=eta, num_samples_per_batch=n)
            except ValueError as e:
                failed.update({i: RowError("bad_params", str(e)) for i in idx})
        out: list[Result | RowError] = []
        for i, s in enumerate(samples):
            if i in failed:
                out.append(failed[i])
                continue
            te, ie = text_embed[i].float().cpu().numpy(), image_embed[i].float().cpu().numpy()
            state = dataclasses.replace(s.state, source=None, text_encodings=text_enc[i].float().cpu().numpy(), image_embed=ie)
            out.append(Result(state, embeddings={"text_embed": te, "image_embed": ie}, params=used.get(i)))
        return out

    return run


def build_unet_stage(number: int):
    @from_cache
    def build(ctx: StageContext):
        from modeling.dalle2.load import Stack
        from modeling.dalle2.sampling import per_sample_noise, sample_unet

        _setup(ctx)
        stack, device, dtype = Stack.from_json(ctx.model_path, fetch=False), ctx.device, _dtype(ctx.dtype)
        decoder = stack.decoder([number], dtype=dtype, device=device)
        p, unet = decoder.params, decoder.unets[number - 1]
        if ctx.options.get("channels_last"):
            unet.to(memory_format=torch.channels_last)
        if ctx.options.get("compile"):  # true, or a torch.compile mode such as "reduce-overhead"
            mode = ctx.options["compile"] if isinstance(ctx.options["compile"], str) else "default"
            unet.forward = torch.compile(unet.forward, mode=mode)
        n, i = len(p.unets), number - 1
        default_scale = stack.default_cond_scales()[1][i]
        last = number == n

        def settings(s: Sample):
            q = s.params
            scale = _per_unet(q.decoder_cond_scale, n, i, "decoder_cond_scale")
            scale = scale if scale is not None else default_scale if default_scale is not None else 1.0
            return (_per_unet(q.decoder_steps, n, i, "decoder_steps"), scale, q.decoder_eta, q.lowres_noise_level,
                    s.task == "edit", getattr(q, "inpaint_resample_times", 5))

        @torch.no_grad()
        def run(samples: list[Sample]) -> list[Result | RowError]:
            out: list[Result | RowError | None] = [None] * len(samples)
            keys: dict[int, tuple] = {}
            for j, s in enumerate(samples):
                try:
                    keys[j] = settings(s)
                except RowError as e:
                    out[j] = e
            for (steps, scale, eta, level, edit, resample), idx in _groups(list(keys), keys.__getitem__).items():
                used = {}  # the params as used: this unet's steps and scale resolved (recorded in images/)
                for j in idx:
                    q = samples[j].params
                    used[j] = q.model_copy(update={
                        "decoder_steps": _with_unet(q.decoder_steps, n, i, steps or p.sample_timesteps[i] or p.timesteps),
                        "decoder_cond_scale": _with_unet(q.decoder_cond_scale, n, i, scale)})
                t = lambda k: torch.from_numpy(np.stack([np.asarray(getattr(samples[j].state, k)) for j in idx])).to(device)  # noqa: E731
                kw = {}
                if edit:
                    kw = dict(inpaint_image=t("inpaint_image").permute(0, 3, 1, 2).float() / 255,
                              inpaint_mask=t("inpaint_mask").bool(), inpaint_resample_times=resample)
                noise = per_sample_noise([_generator(samples[j].sample_seed, f"unet{number}") for j in idx], device)
                try:
                    img = sample_unet(unet, p, number, t("image_embed").float(), t("text_encodings").float(),
                                      noise, prev_image=t("image").float() if number > 1 else None,
                                      steps=steps, cond_scale=scale, eta=eta, lowres_noise_level=level, **kw)
                except ValueError as e:
                    for j in idx:
                        out[j] = RowError("bad_params", str(e))
                    continue
                for j, x in zip(idx, img.float().cpu()):
                    if last:
                        out[j] = Result(pixels=(x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy(), params=used[j])
                    else:
                        out[j] = Result(dataclasses.replace(samples[j].state, image=x.numpy()), params=used[j])
            return [r for r in out if r is not None]

        return run

    return build


def unet_stage(number: int) -> StageSpec:
    return StageSpec("decoder" if number == 1 else f"upsampler{number}", build_unet_stage(number), batch_size=16)


DEMO_SETTINGS = ["sampler.t2i.prior_steps=8", "sampler.t2i.decoder_steps=8", "sampler.variation.decoder_steps=8",
                 "sampler.edit.prior_steps=8", "sampler.edit.decoder_steps=8", "sampler.edit.inpaint_resample_times=2"]


class Dalle2Family:
    name = "dalle2"
    tasks = {
        "t2i": TaskSpec(T2IParams),
        "variation": TaskSpec(VariationParams, needs_prompt=False, inputs=(InputSpec("image"),)),
        "edit": TaskSpec(EditParams, inputs=(InputSpec("image"), InputSpec("mask"))),
    }
    scores: dict[str, str] = {}

    def stages(self, model: str) -> list[StageSpec]:
        from modeling.dalle2.config import ModelLoadConfig

        cfg = ModelLoadConfig.from_json(model)
        if cfg.decoder is None:
            raise ValueError(f"{model}: the model config has no decoder")
        return [StageSpec("prepare", build_prepare, num_gpus=0, batch_size=16, reads_inputs=True),
                StageSpec("prior", build_prior, batch_size=16),
                *(unet_stage(k) for k in range(1, cfg.decoder.num_unets + 1))]

    def check_model(self, model: str) -> None:
        """The dalle2-laion config parses and has a decoder; every local file it names is there, and every url
        file is fetched into its cache_dir and verified (or its cached copy, verified when fetched, is intact).
        The driver calls this before Ray starts: the stages then only read the cache (`from_cache`)."""
        from modeling.dalle2.clip import OPENAI_MODELS
        from modeling.dalle2.config import ModelLoadConfig
        from modeling.dalle2.load import local_path, resolve_file

        path, where = Path(model), f"dalle2 model {model}"
        if path.is_dir():
            configs = sorted(p.name for p in path.glob("*.json"))
            raise ModelError(f"{where}: is a directory; give its dalle2-laion config JSON"
                             + (f" (here: {', '.join(configs)})" if configs else ""))
        if not path.is_file():
            raise ModelError(f"{where}: no such file (a dalle2-laion model config JSON)")
        try:
            cfg = ModelLoadConfig.from_json(path)
        except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise ModelError(f"{where}: {' '.join(str(e).split())[:500]}") from None
        if cfg.decoder is None:
            raise ModelError(f"{where}: the config has no decoder")
        files = list({f.path: f for f in cfg.files()}.values())
        for f in files:
            if f.load_type == "local" and not local_path(f, path.parent).is_file():
                raise ModelError(f"{where}: missing {f.path} (named by the config)")
            if f.load_type == "url" and f.cache_dir is None:
                raise ModelError(f"{where}: url file {f.path} has no cache_dir; give it one: the driver fetches url "
                                 "files into it before the job starts, and the stages read them only from there")
        clip = cfg.clip.model if cfg.clip else None
        # a local CLIP directory (relative ones beside the config, as Stack.clip finds them); Hugging Face ids are org/name
        if clip and clip not in OPENAI_MODELS and (clip.startswith(("/", ".")) or "/" not in clip or (path.parent / clip).exists()):
            d = Path(clip) if Path(clip).is_absolute() else path.parent / clip
            if not (d / "config.json").is_file():
                raise ModelError(f"{where}: clip.model {clip}: missing {d / 'config.json'} (a transformers CLIPModel directory)")
        for f in files:  # the local checks first: a download is the slow part
            if f.load_type == "url":
                try:
                    resolve_file(f, path.parent)
                except (OSError, ValueError) as e:  # FetchError, ChecksumError: one line naming the URL and why
                    raise ModelError(f"{where}: {' '.join(str(e).split())}") from None

    def model_name(self, model: str) -> str:
        return "dalle2:" + Path(model).stem

    def model_fingerprint(self, model: str) -> str:
        """The config JSON, and for each local file it names: name, size and any JSON content."""
        from modeling.dalle2.config import ModelLoadConfig
        from modeling.dalle2.load import local_path

        path = Path(model)
        h = hashlib.sha256(path.read_bytes())
        local = {f.path: f for f in ModelLoadConfig.from_json(path).files() if f.load_type == "local"}
        for name in sorted(local):
            p = local_path(local[name], path.parent)
            if p.is_file():
                h.update(f"{name}:{p.stat().st_size}\n".encode())
                if p.suffix == ".json" and p.stat().st_size < 16 << 20:
                    h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def write_tiny(self, directory: str) -> str:
        from modeling.dalle2.tiny import write_tiny

        return str(write_tiny(directory))

    def demo(self) -> Demo:
        rows: list[dict[str, Any]] = [{"id": f"t2i-{i}", "task": "t2i", "prompt": p, "num_samples": 2 if i == 0 else 1}
                                      for i, p in enumerate(PROMPTS)]
        rows.append({"id": "variation-0", "task": "variation", "image": demo_png(1)})
        rows.append({"id": "inpaint-0", "task": "edit", "prompt": "a green square", "image": demo_png(2), "mask": demo_png(0, mask=True)})
        rows.append({"id": "bad-0", "task": "t2i", "prompt": "   "})  # shows where bad rows go
        return Demo(rows, DEMO_SETTINGS)


FAMILY = Dalle2Family()
