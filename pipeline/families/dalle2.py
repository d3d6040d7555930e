"""DALLE2 (LAION release / DALLE2-pytorch) as a genfleet family.

The model path is a dalle2-laion model config JSON. Tasks: t2i, variation (CLIP image
embedding -> decoder), edit (text-guided RePaint inpainting; mask white = repaint).
Stages, in order (the model stages each able to sit on its own GPU actor):
    prepare      CPU: row checks, input image / mask decoding and resizing
    prior        CLIP text (+ image) encoding, prior sampling with reranking
    decoder      unet 1
    upsamplerK   unet K (K = 2..N, read from the config)
Params left at None take the model config's defaults (default_sample_timesteps,
default_cond_scale), then the checkpoint config's, then 64 steps / scale 1.
Stage options (decoder / upsampler stages): channels_last, compile (torch.compile the unet).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.family import BatchFn, Row, RowError, StageContext, StageSpec

COMMON = {"decoder_steps": None, "decoder_cond_scale": None, "decoder_eta": 0.0, "lowres_noise_level": None}
PRIOR = {"prior_steps": None, "prior_cond_scale": None, "prior_eta": 1.0, "num_samples_per_batch": 2}
DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {**PRIOR, **COMMON},
    "variation": dict(COMMON),
    "edit": {**PRIOR, **COMMON, "inpaint_resample_times": 5},
}
FALLBACK_STEPS = 64
BIG_FIELDS = ("dalle2_source", "dalle2_text_encodings", "dalle2_image_embed", "dalle2_image", "dalle2_inpaint_image",
              "dalle2_inpaint_mask")


def _num(key: str, v: Any, lo: float, hi: float, integer: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and float(v) != int(v)):
        raise RowError("bad_params", f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not lo <= v <= hi:
        raise RowError("bad_params", f"{key} must be in [{lo}, {hi}], got {v!r}")
    return int(v) if integer else float(v)


def _one_or_list(key: str, v: Any, lo: float, hi: float, integer: bool = False):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if not v:
            raise RowError("bad_params", f"{key} must not be an empty list")
        return [None if x is None else _num(key, x, lo, hi, integer) for x in v]
    return _num(key, v, lo, hi, integer)


def _check(key: str, v: Any) -> Any:
    if key == "decoder_steps":
        return _one_or_list(key, v, 1, 10000, integer=True)
    if key == "decoder_cond_scale":
        return _one_or_list(key, v, 0.0, 100.0)
    if v is None and key in ("prior_steps", "prior_cond_scale", "lowres_noise_level"):
        return None
    limits = {"prior_steps": (1, 10000, True), "prior_cond_scale": (0.0, 100.0, False), "prior_eta": (0.0, 10.0, False),
              "decoder_eta": (0.0, 10.0, False), "num_samples_per_batch": (1, 64, True),
              "lowres_noise_level": (0.0, 0.999, False), "inpaint_resample_times": (1, 100, True)}
    lo, hi, integer = limits[key]
    return _num(key, v, lo, hi, integer)


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
    """Indices grouped by key(index), in order: rows sharing sampler settings run as one batch."""
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


def _square(img, size: int, resample):
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), resample if s != size else Image.NEAREST)


# ---- stages ------------------------------------------------------------------------------
def build_prepare(ctx: StageContext) -> BatchFn:
    """CPU: row checks, input image / mask decoding and resizing, outside the GPU actors."""
    from PIL import Image

    from modeling.dalle2.load import Stack
    from pipeline.inputs import load_image

    final = Stack.from_json(ctx.model_path).decoder_params().image_sizes[-1]

    def run(rows: list[Row]) -> list[Row]:
        outs: list[Row] = []
        for r in rows:
            if r.get("negative_prompt"):
                raise RowError("bad_params", "dalle2 does not support negative_prompt")
            for k in ("width", "height"):
                if r.get(k) not in (None, final):
                    raise RowError("bad_params", f"dalle2 makes {final}x{final} images; {k}={r[k]}")
            out: Row = {}
            if r["task"] == "variation":
                out["dalle2_source"] = load_image(r.get("image"))
            if r["task"] == "edit":
                img = _square(load_image(r.get("image")), final, Image.BICUBIC)
                mask = _square(load_image(r.get("mask"), mode="L"), final, Image.NEAREST)
                out["dalle2_inpaint_image"] = np.asarray(img, dtype=np.uint8)
                out["dalle2_inpaint_mask"] = np.asarray(mask) < 128  # True = keep (not painted)
            outs.append(out)
        return outs

    return run


def build_prior(ctx: StageContext) -> BatchFn:
    from modeling.dalle2.load import Stack
    from modeling.dalle2.sampling import per_sample_noise, sample_prior

    _setup(ctx)
    stack, device, dtype = Stack.from_json(ctx.model_path), ctx.device, _dtype(ctx.dtype)
    clip = stack.clip(dtype=dtype, device=device)
    prior = stack.prior(dtype=dtype, device=device) if stack.config.prior else None
    default_scale = stack.default_cond_scales()[0]

    @torch.no_grad()
    def run(rows: list[Row]) -> list[Row]:
        ids = clip.tokenize([r.get("prompt") or "" for r in rows])
        text_embed, text_enc = clip.embed_text(ids)
        image_embed = torch.zeros_like(text_embed)
        outs: list[Row] = [{} for _ in rows]
        var = [i for i, r in enumerate(rows) if r["task"] == "variation"]
        if var:
            image_embed[var] = clip.embed_image(clip.preprocess([rows[i]["dalle2_source"] for i in var]).to(device))
        gen = [i for i, r in enumerate(rows) if r["task"] in ("t2i", "edit")]
        if gen and prior is None:
            raise RowError("bad_params", "this model config has no prior: only variation rows can run")
        key = lambda i: tuple(rows[i]["params"].get(k) for k in PRIOR)
        for (steps, scale, eta, n), idx in _groups(gen, key).items():
            noise = per_sample_noise([_generator(rows[i]["sample_seed"], "prior") for i in idx], device)
            scale = scale if scale is not None else default_scale if default_scale is not None else 1.0
            try:
                image_embed[idx] = sample_prior(prior, text_embed[idx], text_enc[idx], noise,
                                                steps=steps or prior.params.sample_timesteps or FALLBACK_STEPS,
                                                cond_scale=scale, eta=eta, num_samples_per_batch=n)
            except ValueError as e:
                raise RowError("bad_params", str(e)) from None
        for i in range(len(rows)):
            outs[i]["dalle2_source"] = None  # decoded input: not needed past CLIP
            te, ie = text_embed[i].float().cpu().numpy(), image_embed[i].float().cpu().numpy()
            outs[i].update(dalle2_text_encodings=text_enc[i].float().cpu().numpy(), dalle2_image_embed=ie,
                           embeddings={"text_embed": te, "image_embed": ie})
        return outs

    return run


def build_unet_stage(number: int):
    def build(ctx: StageContext) -> BatchFn:
        from modeling.dalle2.load import Stack
        from modeling.dalle2.sampling import per_sample_noise, sample_unet

        _setup(ctx)
        stack, device, dtype = Stack.from_json(ctx.model_path), ctx.device, _dtype(ctx.dtype)
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

        def settings(r: Row):
            q = r["params"]
            steps = _per_unet(q.get("decoder_steps"), n, i, "decoder_steps") or p.sample_timesteps[i] or FALLBACK_STEPS
            scale = _per_unet(q.get("decoder_cond_scale"), n, i, "decoder_cond_scale")
            scale = scale if scale is not None else default_scale if default_scale is not None else 1.0
            return (steps, scale, q.get("decoder_eta", 0.0), q.get("lowres_noise_level"),
                    r["task"] == "edit", q.get("inpaint_resample_times", 5))

        @torch.no_grad()
        def run(rows: list[Row]) -> list[Row]:
            outs: list[Row] = [{} for _ in rows]
            keys = [settings(r) for r in rows]
            for (steps, scale, eta, level, edit, resample), idx in _groups(range(len(rows)), keys.__getitem__).items():
                t = lambda k: torch.from_numpy(np.stack([np.asarray(rows[j][k]) for j in idx])).to(device)
                kw = {}
                if edit:
                    kw = dict(inpaint_image=t("dalle2_inpaint_image").permute(0, 3, 1, 2).float() / 255,
                              inpaint_mask=t("dalle2_inpaint_mask").bool(), inpaint_resample_times=resample)
                noise = per_sample_noise([_generator(rows[j]["sample_seed"], f"unet{number}") for j in idx], device)
                try:
                    img = sample_unet(unet, p, number, t("dalle2_image_embed").float(), t("dalle2_text_encodings").float(),
                                      noise, prev_image=t("dalle2_image").float() if number > 1 else None,
                                      steps=steps, cond_scale=scale, eta=eta, lowres_noise_level=level, **kw)
                except ValueError as e:
                    raise RowError("bad_params", str(e)) from None
                for j, x in zip(idx, img.float().cpu()):
                    if last:
                        pixels = (x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
                        outs[j].update({k: None for k in BIG_FIELDS}, pixels=pixels)
                    else:
                        outs[j]["dalle2_image"] = x.numpy()
            return outs

        return run

    return build


PREPARE_STAGE = StageSpec("prepare", build_prepare, uses_gpu=False, default_batch_size=16)
PRIOR_STAGE = StageSpec("prior", build_prior, default_batch_size=16)


def unet_stage(number: int) -> StageSpec:
    return StageSpec("decoder" if number == 1 else f"upsampler{number}", build_unet_stage(number), default_batch_size=16)


class Dalle2Family:
    name = "dalle2"
    tasks = frozenset(DEFAULTS)

    def stages(self, model_path: str) -> list[StageSpec]:
        from modeling.dalle2.config import ModelLoadConfig

        cfg = ModelLoadConfig.from_json(model_path)
        if cfg.decoder is None:
            raise ValueError(f"{model_path}: the model config has no decoder")
        return [PREPARE_STAGE, PRIOR_STAGE, *(unet_stage(k) for k in range(1, cfg.decoder.num_unets + 1))]

    def params_for(self, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
        if task not in DEFAULTS:
            raise RowError("bad_params", f"dalle2 serves {sorted(DEFAULTS)}, not {task!r}")
        out = dict(DEFAULTS[task])
        for k, v in (overrides or {}).items():
            if k not in out:
                raise RowError("bad_params", f"unknown {task} parameter {k!r} (known: {sorted(out)})")
            out[k] = _check(k, v)
        return out

    def model_name(self, model_path: str) -> str:
        return "dalle2:" + Path(model_path).stem

    def model_fingerprint(self, model_path: str) -> str:
        """The config JSON, and for each local file it names: name, size and any JSON content."""
        path = Path(model_path)
        h = hashlib.sha256(path.read_bytes())
        for f in sorted(set(_file_paths(json.loads(path.read_text())))):
            p = Path(f) if Path(f).is_absolute() else path.parent / f
            if p.is_file():
                h.update(f"{f}:{p.stat().st_size}\n".encode())
                if p.suffix == ".json" and p.stat().st_size < 16 << 20:
                    h.update(p.read_bytes())
        return h.hexdigest()[:16]


def _file_paths(node: Any):
    if isinstance(node, dict):
        if node.get("load_type") == "local" and isinstance(node.get("path"), str):
            yield node["path"]
        for v in node.values():
            yield from _file_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _file_paths(v)


FAMILY = Dalle2Family()
