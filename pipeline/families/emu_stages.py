"""The Emu stages (pipeline/families/emu.py describes the family), in order:

    prepare     CPU  compose the prompt (text and <image> slots), decode + EVA-transform its
                     images, tokenise, fix the output size
    lmm         GPU  EVA encode of the prompt images + the KV-cached autoregressive loop over the
                     batch (Emu2 image-only rows: pooled EVA features, no LLM); the guidance
                     branches are computed once per actor and cached
    unet        GPU  the denoising loop: samples with equal steps / size / time ids run as one
                     batch, per-row guidance, CFG batched with the conditional rows, each
                     sample's initial noise from its own generator
    vae_decode  GPU  latents -> uint8 pixels; option safety_checker=true adds the `nsfw` flag
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.emu import diffusion as D
from modeling.emu import regress as R
from modeling.emu.decoder import EmuDecoder
from modeling.emu.encoder import Emu2Encoder
from modeling.emu.tokens import Prompt
from pipeline.families.emu_params import SIDE_MAX, SIDE_STRIDE
from pipeline.family import StageContext
from pipeline.sample import Result, RowError, Sample

PLACEHOLDER = "<image>"  # where a compose prompt places its next image
EMBEDDING = "emu_visual"  # the regressed embeddings in OUTPUT/embeddings/: [n, d]
NSFW = "nsfw"  # the safety checker's per-sample flag (a score column)
LMM_BATCH = 8  # the lmm stage's default batch size, and the rows its KV cache holds at first
CACHE_LEN = 512  # default KV cache length (tokens); a longer prompt grows the cache once
Results = list[Result | RowError]


@dataclass(frozen=True)
class EmuState:
    size: tuple[int, int]  # (height, width) of the image to make
    prompt: Prompt | None = None  # ids ending in the generating [IMG]; None: Emu2 autoencoding (no LLM)
    pixels: np.ndarray | None = None  # [k, 3, S, S] float32, EVA-normalised prompt images in order
    cond: np.ndarray | None = None  # [n, d] the regressed embeddings: the unet's context
    uncond: np.ndarray | None = None  # [n, d] its guidance branch (only rows guided, scale > 1)
    latent: np.ndarray | None = None  # [4, H/8, W/8] the denoised latent


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _isolated(fn: Callable[[Sample], Result], samples: list[Sample]) -> Results:
    out: Results = []
    for s in samples:
        try:
            out.append(fn(s))
        except RowError as e:
            out.append(e)
    return out


def _groups(samples: list[Sample], key: Callable[[Sample], Hashable]) -> dict[Any, list[int]]:
    """Indices by key, in order: samples that share settings run as one batch."""
    out: dict[Any, list[int]] = {}
    for i, s in enumerate(samples):
        out.setdefault(key(s), []).append(i)
    return out


def prompt_parts(prompt: str | None, images: list[Any]) -> list[Any]:
    """A compose prompt as the model's parts: text runs and images in order. Each `<image>`
    takes the next image; a prompt without any puts the images first. A prompt that is only
    whitespace (or only placeholders) leaves the images alone (Emu2: autoencoding)."""
    pieces = (prompt or "").split(PLACEHOLDER)
    slots = len(pieces) - 1
    if slots and slots != len(images):
        raise RowError("bad_prompt", f"prompt has {slots} {PLACEHOLDER} placeholder(s) for {len(images)} image(s): "
                       f"give one {PLACEHOLDER} per image, or none (images first)")
    if not "".join(pieces).strip():
        return list(images)
    if not slots:
        return [*images, prompt]
    parts: list[Any] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if i < slots:
            parts.append(images[i])
    return parts


def _side(name: str, value: int) -> int:
    if not SIDE_STRIDE <= value <= SIDE_MAX or value % SIDE_STRIDE:
        raise RowError("bad_params", f"{name} must be a multiple of {SIDE_STRIDE} in [{SIDE_STRIDE}, {SIDE_MAX}], got {value}")
    return value


# ---- prepare (CPU) -------------------------------------------------------------------------
def build_prepare(variant: str, ctx: StageContext):
    from modeling.emu.load import encoder_params, load_tokenizer
    from modeling.emu.transforms import EvaTransform
    from pipeline.inputs import decode_image

    tok = load_tokenizer(ctx.model_path, variant, ctx.options.get("tokenizer", "slow"))
    p = encoder_params(ctx.model_path, variant)
    transform = EvaTransform(p.eva.image_size)
    n_embeds = p.n_query if variant == "emu2" else p.n_causal  # type: ignore[union-attr]
    max_positions = p.llm.max_positions

    def prepare(s: Sample) -> Result:
        if s.negative_prompt:
            raise RowError("bad_params", "emu has no negative prompt: its guidance branch is the empty prompt")
        h, w = s.params.default_size
        size = (_side("height", s.height or h), _side("width", s.width or w))
        images = [decode_image(data) for data in s.inputs.get("images") or []] if s.task == "compose" else []
        parts = prompt_parts(s.prompt, images) if s.task == "compose" else [s.prompt or ""]  # t2i: "<image>" is text
        pixels = transform.batch(images).numpy() if images else None
        if variant == "emu2" and len(images) == 1 and R.is_autoencode(parts):
            return Result(EmuState(size, None, pixels))
        prompt = tok.encode(parts)
        if len(prompt.ids) + n_embeds - 1 > max_positions:
            raise RowError("prompt_too_long", f"prompt is {len(prompt.ids)} tokens (images included); with the {n_embeds} "
                           f"embeddings to regress that passes the model's {max_positions} positions")
        return Result(EmuState(size, prompt, pixels))

    return lambda samples: _isolated(prepare, samples)


# ---- lmm (GPU) -----------------------------------------------------------------------------
def _step(option: object, device: str):
    """The single-token step: replayed from a CUDA graph on a GPU (the default), eager on CPU,
    or torch.compile'd (`step: compile`, or a torch.compile mode name); the prefill, whose
    length varies with every batch, always runs eagerly."""
    choice = option if option is not None else ("graph" if device.startswith("cuda") else "eager")
    if choice == "eager":
        return R.decode_step
    if choice == "graph":
        return R.GraphedStep()
    compiled = torch.compile(R.decode_step, mode=None if choice == "compile" else str(choice), dynamic=False)

    def step(enc, x, cols, pos, key_valid):
        return (compiled if x.shape[1] == 1 else R.decode_step)(enc, x, cols, pos, key_valid)

    return step


class Lmm:
    def __init__(self, variant: str, ctx: StageContext):
        from modeling.emu.load import load_encoder, load_tokenizer

        self.enc = load_encoder(ctx.model_path, ctx.device, _dtype(ctx.dtype))
        self.tok = load_tokenizer(ctx.model_path, variant)  # for "": both modes give [BOS, [IMG]]
        self.enc.setup_caches(LMM_BATCH, int(ctx.options.get("max_len", CACHE_LEN)))
        self.step = _step(ctx.options.get("step"), str(ctx.device))
        self._uncond: dict[str, torch.Tensor] = {}

    def emu2(self) -> Emu2Encoder:
        assert isinstance(self.enc, Emu2Encoder)  # prepare makes autoencoding rows for Emu2 only
        return self.enc

    def uncond(self, autoencoded: bool) -> np.ndarray:
        """The guidance branch, the same for every row: the text "" with no image (Emu2's
        autoencoding: EVA of an all-zero normalised image). Computed once per actor."""
        kind = "image" if autoencoded else "text"
        if kind not in self._uncond:
            self._uncond[kind] = R.autoencode_uncond(self.emu2()) if autoencoded else R.unconditional(self.enc, self.tok)
        return _np(self._uncond[kind][0])

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> Results:
        # samples of one manifest row share its prompt (ids are unique): one computation per row
        first = {s.id: i for i, s in reversed(list(enumerate(samples)))}
        rows = sorted(first.values())
        llm = [i for i in rows if samples[i].state.prompt is not None]
        auto = [i for i in rows if samples[i].state.prompt is None]
        cond: dict[int, np.ndarray] = {}
        if llm:
            pixels = [torch.from_numpy(samples[i].state.pixels) if samples[i].state.pixels is not None else None for i in llm]
            x, valid = R.prompt_inputs(self.enc, [samples[i].state.prompt for i in llm], R.image_inputs(self.enc, pixels))
            cond.update(zip(llm, map(_np, R.regress(self.enc, x, valid, step=self.step).embeds)))
        if auto:
            images = torch.from_numpy(np.concatenate([samples[i].state.pixels for i in auto]))
            cond.update(zip(auto, map(_np, R.autoencode(self.emu2(), images))))
        out: Results = []
        for s in samples:
            c = cond[first[s.id]]
            u = self.uncond(s.state.prompt is None) if s.params.guidance_scale > 1 else None
            out.append(Result(EmuState(s.state.size, cond=c, uncond=u), embeddings={EMBEDDING: c}))
        return out


# ---- unet (GPU) ----------------------------------------------------------------------------
def _time_ids(s: Sample) -> dict[str, Any]:
    """Emu2's micro-conditioning overrides, when the row sets them (Emu1's params have none)."""
    given = {"original_size": getattr(s.params, "original_size", None), "crop_info": getattr(s.params, "crop_top_left", None)}
    return {k: tuple(v) for k, v in given.items() if v is not None}


class Unet:
    def __init__(self, variant: str, ctx: StageContext):
        from modeling.emu.decoder import load_decoder

        self.dec = load_decoder(ctx.model_path, variant, ctx.device, _dtype(ctx.dtype))
        mode = ctx.options.get("compile")
        if mode:
            self.dec.unet.forward = torch.compile(self.dec.unet.forward, mode=mode if isinstance(mode, str) else "default")

    def __call__(self, samples: list[Sample]) -> Results:
        key = lambda s: (s.params.num_inference_steps, s.state.size, tuple(sorted(_time_ids(s).items())))  # noqa: E731
        out: list[Result | RowError | None] = [None] * len(samples)
        for (steps, (h, w), _), idx in _groups(samples, key).items():
            states = [samples[i].state for i in idx]
            cond = torch.from_numpy(np.stack([st.cond for st in states]))
            guided = [st.uncond is not None for st in states]
            uncond = None
            if any(guided):  # unguided rows' slots are never read (denoise passes only guided rows)
                uncond = torch.from_numpy(np.stack([st.uncond if st.uncond is not None else np.zeros_like(st.cond) for st in states]))
            gens = [torch.Generator().manual_seed(int(samples[i].sample_seed)) for i in idx]
            try:
                latents = D.denoise(self.dec, cond, uncond, height=h, width=w, steps=steps,
                                    guidance=[samples[i].params.guidance_scale for i in idx], generators=gens,
                                    **_time_ids(samples[idx[0]]))
            except ValueError as e:
                for i in idx:
                    out[i] = RowError("bad_params", str(e))
                continue
            for i, st, z in zip(idx, states, latents):
                out[i] = Result(EmuState(st.size, latent=_np(z)))
        return [r for r in out if r is not None]


# ---- vae_decode (GPU) ----------------------------------------------------------------------
@dataclass
class VaeDecoder(EmuDecoder):
    """The decoder without its unet: a vae_decode actor holds only the VAE (and the safety checker)."""

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype


def load_vae(model: str, variant: str, device: str, dtype: torch.dtype, safety_checker: bool) -> VaeDecoder:
    from modeling.emu import decoder as E
    from modeling.emu.config import read_json

    E.check_decoder_layout(model, variant, safety_checker)  # names a missing file before anything loads
    d = Path(model)
    config = lambda kind: read_json(d / E.CONFIGS[kind])  # noqa: E731

    def part(kind: str, build):
        path = E.weight_path(d, variant, kind)
        return E.load_strict(build(config(kind)), kind, E.read_weights(path, device, dtype), path, device)

    return VaeDecoder(variant, unet=None, vae=part("vae", E.build_vae), scheduler_config={},  # type: ignore[arg-type]
                      safety_checker=part("safety_checker", E.build_safety_checker) if safety_checker else None,
                      feature_extractor=config("feature_extractor") if safety_checker else None)


class VaeDecode:
    def __init__(self, variant: str, ctx: StageContext):
        self.safety = bool(ctx.options.get("safety_checker", False))
        self.dec = load_vae(ctx.model_path, variant, ctx.device, _dtype(ctx.dtype), self.safety)

    def __call__(self, samples: list[Sample]) -> Results:
        out: list[Result | RowError | None] = [None] * len(samples)
        for _, idx in _groups(samples, lambda s: s.state.latent.shape).items():
            pixels, _ = D.decode(self.dec, torch.from_numpy(np.stack([samples[i].state.latent for i in idx])))
            flags = D.safety_check(self.dec, pixels) if self.safety else [None] * len(idx)  # flags only: images stay
            for i, px, flag in zip(idx, pixels.cpu().numpy(), flags):
                out[i] = Result(pixels=px, scores=None if flag is None else {NSFW: flag})
        return [r for r in out if r is not None]


def builder(stage: Callable[[str, StageContext], Callable[[list[Sample]], Results]], variant: str):
    """A StageSpec.build for one variant: builds the stage once per actor."""
    return functools.partial(stage, variant)
