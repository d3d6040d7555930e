"""BAGEL (ByteDance-Seed/Bagel, released BAGEL-7B-MoT layout) as a genfleet family.

Tasks: t2i, edit, understand. Stages, in order (each builds only what it needs):
    prepare     CPU   decode + resize the input image, tokenise the prompt, fix the size
    vae_encode  GPU   edit rows: input pixels -> clean latents (posterior sample, per-sample seed)
    lmm         GPU   text decoding (understand, and the plan of think=true rows), then
                      contexts + batched CFG denoising (t2i/edit)
    vae_decode  GPU   latents -> pixels; option emit_latents=true adds embeddings["bagel_latent"] [C, H/8, W/8]
To run the GPU stages on one actor, co-locate them in the job spec
(`stages: {lmm: {colocate: true}, vae_decode: {colocate: true}}`): co-located VAE stages
with the same device and vae_dtype share one AE.
Stage options: vae_transform / vit_transform ([max, min, stride], prepare); emit_latents
(vae_decode); vae_dtype (VAE stages; default: the stage dtype -- float32 is what the
reference app uses for the VAE); lmm: quantize (nf4 | int8, bitsandbytes on CUDA; fp8: e4m3 GEMMs),
attention (split | masked, see modeling/bagel/attn.py), compile (bool), split_devices (N: the
LLM layers split across the actor's first N GPUs, for `num_gpus: N`; modeling/layer_split.py).
Edit outputs take the input's resized size (row width/height are ignored); t2i sizes
must be multiples of 16, <= 1024. Sampler defaults are the reference's (modeling/bagel/sampling.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field, StrictBool, model_validator

from modeling.bagel.sampling import EDIT_DEFAULTS, T2I_DEFAULTS, ImageParams
from pipeline.demo_images import PROMPTS, demo_png
from pipeline.family import Demo, InputSpec, ModelError, Params, StageContext, StageSpec, TaskSpec
from pipeline.sample import Result, RowError, Sample

VAE_SEED_SALT = 0x5EED_BA6E  # the VAE posterior draws from its own stream of the sample seed
Scale = Annotated[float, Field(strict=True, ge=0.0, le=100.0)]
Unit = Annotated[float, Field(strict=True, ge=0.0, le=1.0)]
Side = Annotated[int, Field(strict=True, ge=16, le=1024, multiple_of=16)]
Renorm = Literal["global", "channel", "text_channel"]


class TextParams(Params):
    """Text decoding. think: reason (understand) or plan (t2i, edit) in text first, as the
    reference's think=True; these settings apply to that text."""

    think: StrictBool = False
    max_think_token_n: Annotated[int, Field(strict=True, ge=1, le=32768)] = 1000
    do_sample: StrictBool = False
    text_temperature: Annotated[float, Field(strict=True, ge=1e-4, le=100.0)] = 0.3


class _ImageParams(TextParams):
    cfg_text_scale: Scale = T2I_DEFAULTS.cfg_text_scale
    cfg_img_scale: Scale = T2I_DEFAULTS.cfg_img_scale
    cfg_interval: tuple[Unit, Unit] = T2I_DEFAULTS.cfg_interval
    cfg_renorm_type: Renorm = T2I_DEFAULTS.cfg_renorm_type  # type: ignore[assignment]
    cfg_renorm_min: Unit = T2I_DEFAULTS.cfg_renorm_min
    timestep_shift: Annotated[float, Field(strict=True, ge=1e-3, le=1000.0)] = T2I_DEFAULTS.timestep_shift
    num_timesteps: Annotated[int, Field(strict=True, ge=2, le=1000)] = T2I_DEFAULTS.num_timesteps
    # approximate, off at 1: the model runs every Nth step, the velocity is extrapolated between
    step_cache_interval: Annotated[int, Field(strict=True, ge=1, le=100)] = T2I_DEFAULTS.step_cache_interval
    step_cache_warmup: Annotated[int, Field(strict=True, ge=2, le=1000)] = T2I_DEFAULTS.step_cache_warmup

    @model_validator(mode="after")
    def _interval(self):
        if self.cfg_interval[0] > self.cfg_interval[1]:
            raise ValueError(f"cfg_interval lo > hi: {list(self.cfg_interval)}")
        return self

    def image(self) -> ImageParams:
        return ImageParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ImageParams)})


class T2IParams(_ImageParams):
    image_shapes: tuple[Side, Side] = (1024, 1024)  # [height, width] when the row gives none


class EditParams(_ImageParams):
    cfg_img_scale: Scale = EDIT_DEFAULTS.cfg_img_scale
    cfg_interval: tuple[Unit, Unit] = EDIT_DEFAULTS.cfg_interval
    cfg_renorm_type: Renorm = EDIT_DEFAULTS.cfg_renorm_type  # type: ignore[assignment]


@dataclass(frozen=True)
class BagelState:
    prompt_ids: list[int]
    size: tuple[int, int] | None = None  # (height, width) of the image to make
    vae_pixels: np.ndarray | None = None  # edit: [3, H, W] in [-1, 1]
    vit_patches: np.ndarray | None = None  # edit / understand: [n, 3 * 14 * 14]
    vit_grid: tuple[int, int] | None = None
    vae_latent: np.ndarray | None = None  # edit: clean latent [C, H/8, W/8]
    latent: np.ndarray | None = None  # packed denoised latent


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.asarray(a))


def _side(name: str, v: int, stride: int, limit: int) -> int:
    if not stride <= v <= limit or v % stride:
        raise RowError("bad_params", f"{name} must be a multiple of {stride} in [{stride}, {limit}], got {v}")
    return v


# ---- stages ------------------------------------------------------------------------------
def build_prepare(ctx: StageContext):
    from modeling.bagel.load import bagel_params, encode_text, load_tokenizer
    from modeling.bagel.transforms import VAE_RULE, VIT_RULE, ResizeRule, prepare_image
    from pipeline.inputs import decode_image

    tok, _ = load_tokenizer(ctx.model_path)
    p = bagel_params(ctx.model_path)
    ds, limit = p.latent_downsample, p.latent_downsample * p.max_latent_size
    vae_rule = ResizeRule(*ctx.options["vae_transform"]) if "vae_transform" in ctx.options else VAE_RULE
    vit_rule = ResizeRule(*ctx.options["vit_transform"]) if "vit_transform" in ctx.options else VIT_RULE

    def prepare(s: Sample) -> Result:
        if s.negative_prompt:
            raise RowError("bad_params", "bagel has no negative prompt (its CFG drops the prompt instead)")
        ids = encode_text(tok, s.prompt or "")
        if s.task == "t2i":
            h, w = s.params.image_shapes
            size = (_side("height", s.height if s.height is not None else h, ds, limit),
                    _side("width", s.width if s.width is not None else w, ds, limit))
            # the row's width/height override image_shapes: record the size actually made
            return Result(BagelState(ids, size), params=s.params.model_copy(update={"image_shapes": size}))
        img = prepare_image(decode_image(s.inputs.get("image")), vae_rule, vit_rule, vae=s.task == "edit")
        state = BagelState(ids, vit_patches=_to_np(img.vit_patches), vit_grid=(img.vit_grid[0], img.vit_grid[1]))
        if s.task == "edit":
            h, w = img.vae_pixels.shape[-2:]
            state = dataclasses.replace(state, vae_pixels=_to_np(img.vae_pixels), size=(int(h), int(w)))
        return Result(state)

    def run(samples: list[Sample]) -> list[Result | RowError]:
        out: list[Result | RowError] = []
        for s in samples:
            try:
                out.append(prepare(s))
            except RowError as e:
                out.append(e)
        return out

    return run


def _encode(ae, samples: list[Sample]) -> list[Result | RowError]:
    latents: dict[int, np.ndarray] = {}
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        if s.task == "edit":
            groups.setdefault(tuple(s.state.vae_pixels.shape), []).append(i)
    dev = ae.encoder.conv_in.weight.device
    for idx in groups.values():
        x = torch.stack([torch.from_numpy(np.asarray(samples[i].state.vae_pixels)) for i in idx]).to(dev)
        gens = [torch.Generator().manual_seed((int(samples[i].sample_seed) ^ VAE_SEED_SALT) & (2**63 - 1)) for i in idx]
        with torch.inference_mode():
            z = ae.encode(x, gens)
        for i, zi in zip(idx, z):
            latents[i] = _to_np(zi)
    return [Result(dataclasses.replace(s.state, vae_pixels=None, vae_latent=latents[i]) if i in latents else s.state)
            for i, s in enumerate(samples)]


def decode_text(tok, special, ids: list[int]) -> str:
    """Generated ids -> text. The reference keeps only what precedes a second <|im_start|>."""
    if special.bos_token_id in ids:
        ids = ids[: ids.index(special.bos_token_id)]
    return tok.decode(ids)


def _lmm(model, tok, special, system: dict[str, list[int]], samples: list[Sample], attention: str = "split") -> list[Result | RowError]:
    """Text first (understand samples, and the plans of thinking t2i/edit samples), then every
    image's denoising together. system: the thinking prompts' ids, "understand" and "image"."""
    from modeling.bagel import sampling as S

    texts: dict[int, str] = {}
    inputs, txt = [], []
    for i, s in enumerate(samples):
        p, st = s.params, s.state
        vit, lat = _tensor(st.vit_patches), _tensor(st.vae_latent)
        sys_ids = system["understand" if s.task == "understand" else "image"] if p.think else None
        inputs.append((vit, st.vit_grid, lat, sys_ids))
        if s.task == "understand" or p.think:
            g = torch.Generator().manual_seed(int(s.sample_seed))
            txt.append((i, S.TextRow(st.prompt_ids, vit, st.vit_grid, int(p.max_think_token_n) - 1,
                                     bool(p.do_sample), float(p.text_temperature), g, sys_ids, lat)))
    if txt:
        for (i, _), ids in zip(txt, S.generate_text(model, [row for _, row in txt], special)):
            texts[i] = decode_text(tok, special, ids)
    img = []
    for i, (s, (vit, grid, lat, sys_ids)) in enumerate(zip(samples, inputs)):
        if s.task == "understand":
            continue
        (h, w) = s.state.size
        noise = S.get_noise(model, h, w, torch.Generator().manual_seed(int(s.sample_seed)))
        plan = tok.encode(texts[i]) if s.params.think else None  # the reference re-tokenises its decoded plan
        img.append((i, S.ImageRow(s.state.prompt_ids, h, w, noise, s.params.image(), lat, vit, grid, sys_ids, plan)))
    latents: dict[int, np.ndarray] = {}
    if img:
        for (i, _), x in zip(img, S.denoise(model, [row for _, row in img], special, attention=attention)):
            latents[i] = _to_np(x)
    out: list[Result | RowError] = []
    for i, s in enumerate(samples):
        state = BagelState(s.state.prompt_ids, s.state.size, latent=latents.get(i))  # inputs are not needed further
        out.append(Result(state if i in latents else None, text=texts.get(i)))
    return out


def _decode(ae, model_params, samples: list[Sample], emit: bool) -> list[Result | RowError]:
    from modeling.bagel.sampling import decode_to_uint8
    from modeling.bagel.transforms import unpatchify

    out: list[Result | RowError] = []
    for s in samples:
        if s.task == "understand":
            out.append(Result())
            continue
        h, w = s.state.size
        ds = model_params.latent_downsample
        latent = unpatchify(torch.from_numpy(np.asarray(s.state.latent)), h // ds, w // ds, model_params.latent_patch_size)
        emb = {"bagel_latent": latent.numpy().astype(np.float32)} if emit else None  # [C, H/8, W/8]
        out.append(Result(pixels=decode_to_uint8(ae, latent).numpy(), embeddings=emb))
    return out


@functools.lru_cache(maxsize=2)
def _ae(model_path: str, device: str, dtype: str):
    """One AE per (model, device, dtype) in this process: co-located VAE stages share it."""
    from modeling.bagel.load import load_ae

    return load_ae(model_path, device, _dtype(dtype))


def _load_ae(ctx: StageContext):
    return _ae(ctx.model_path, ctx.device, ctx.options.get("vae_dtype", ctx.dtype))


def build_vae_encode(ctx: StageContext):
    ae = _load_ae(ctx)
    return lambda samples: _encode(ae, samples)


def build_lmm(ctx: StageContext):
    from modeling.bagel.load import load_bagel, load_tokenizer
    from modeling.bagel.quant import check_quantize, quantize_llm
    from modeling.bagel.sampling import THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT
    from modeling.layer_split import devices_for

    quant = ctx.options.get("quantize")
    try:
        devices = devices_for(ctx.device, ctx.options.get("split_devices", 1))
    except ValueError as e:
        raise ValueError(f"lmm option split_devices: {e}") from None
    if quant and len(devices) > 1:
        raise ValueError("lmm options quantize and split_devices do not combine: quantized layers stay on one GPU")
    check_quantize(quant, ctx.device)  # before the weights load
    attn = ctx.options.get("attention", "split")
    if attn not in ("split", "masked"):
        raise ValueError(f"lmm option attention must be split or masked, got {attn!r}")
    tok, special = load_tokenizer(ctx.model_path)
    # split: load on the CPU, then each layer goes straight to its device (the whole model may fit on none)
    model: Any = load_bagel(ctx.model_path, "cpu" if quant or len(devices) > 1 else ctx.device, _dtype(ctx.dtype))
    if quant:
        model = quantize_llm(model, quant, ctx.device)
    if len(devices) > 1:
        model.split_layers(devices)
    if ctx.options.get("compile"):
        model.compile_blocks()
    system = {"understand": tok.encode(THINK_UNDERSTAND_PROMPT), "image": tok.encode(THINK_GENERATE_PROMPT)}
    return lambda samples: _lmm(model, tok, special, system, samples, attn)


def build_vae_decode(ctx: StageContext):
    from modeling.bagel.load import bagel_params

    ae, p = _load_ae(ctx), bagel_params(ctx.model_path)
    emit = bool(ctx.options.get("emit_latents", False))
    return lambda samples: _decode(ae, p, samples, emit)


STAGES = [
    StageSpec("prepare", build_prepare, num_gpus=0, batch_size=8, reads_inputs=True),
    StageSpec("vae_encode", build_vae_encode, batch_size=4),
    StageSpec("lmm", build_lmm, batch_size=4),
    StageSpec("vae_decode", build_vae_decode, batch_size=4),
]
IMAGE = InputSpec("image")
DEMO_SETTINGS = ["sampler.t2i.num_timesteps=8", "sampler.edit.num_timesteps=8", "sampler.understand.max_think_token_n=12",
                 "stages.prepare.options.vae_transform=[128,64,16]", "stages.prepare.options.vit_transform=[112,28,14]"]


def check_layout(model: str) -> None:
    """The released layout's files, present and parseable; no weights read."""
    d = Path(model)
    if not d.is_dir():
        raise ModelError(f"bagel model {model}: not a directory (a BAGEL-7B-MoT checkpoint directory)")
    for name in ("llm_config.json", "vit_config.json"):
        try:
            json.loads((d / name).read_text())
        except FileNotFoundError:
            raise ModelError(f"bagel model {model}: missing {name}") from None
        except OSError as e:
            raise ModelError(f"bagel model {model}: {name} cannot be read ({e.strerror or e})") from None
        except ValueError as e:
            raise ModelError(f"bagel model {model}: {name} is not valid JSON ({e})") from None
    if not any((d / n).is_file() for n in ("ema.safetensors", "model.safetensors")):
        raise ModelError(f"bagel model {model}: missing ema.safetensors (or model.safetensors)")
    if not (d / "ae.safetensors").is_file():
        raise ModelError(f"bagel model {model}: missing ae.safetensors")
    if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
        raise ModelError(f"bagel model {model}: missing tokenizer.json (or vocab.json + merges.txt)")


class BagelFamily:
    name = "bagel"
    tasks = {
        "t2i": TaskSpec(T2IParams),
        "edit": TaskSpec(EditParams, inputs=(IMAGE,)),
        "understand": TaskSpec(TextParams, inputs=(IMAGE,)),
    }
    scores: dict[str, str] = {}

    def stages(self, model: str) -> list[StageSpec]:
        return STAGES

    def check_model(self, model: str) -> None:
        check_layout(model)

    def model_name(self, model: str) -> str:
        return "bagel:" + (Path(model).name or "model")

    def model_fingerprint(self, model: str) -> str:
        d, h = Path(model), hashlib.sha256()
        for f in sorted(d.iterdir()) if d.is_dir() else [d]:
            if not f.is_file():
                continue
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
            if f.suffix in (".json", ".txt") and f.stat().st_size < 64 << 20:
                h.update(f.read_bytes())
        return h.hexdigest()[:16]

    def write_tiny(self, directory: str) -> str:
        from modeling.bagel.tiny import write_tiny

        return str(write_tiny(directory))

    def demo(self) -> Demo:
        rows: list[dict[str, Any]] = [{"id": f"t2i-{i}", "task": "t2i", "prompt": p, "num_samples": 2 if i == 0 else 1,
                                       "width": 64, "height": 64} for i, p in enumerate(PROMPTS)]
        rows.append({"id": "edit-0", "task": "edit", "prompt": "make it blue", "image": demo_png(1)})
        rows.append({"id": "understand-0", "task": "understand", "prompt": "what is in the picture?", "image": demo_png(2)})
        rows.append({"id": "bad-0", "task": "t2i", "prompt": "   "})  # shows where bad rows go
        return Demo(rows, DEMO_SETTINGS)


FAMILY = BagelFamily()
