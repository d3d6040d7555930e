"""BAGEL (ByteDance-Seed/Bagel, released BAGEL-7B-MoT layout) as a genfleet family.

Tasks: t2i, edit, understand. Stages, in order (each builds only what it needs):
    prepare     CPU   decode + resize the input image, tokenise the prompt, fix the size
    vae_encode  GPU   edit rows: input pixels -> clean latents (posterior sample, per-row seed)
    lmm         GPU   text decoding (understand, and the plan of think=true rows), then
                      contexts + batched CFG denoising (t2i/edit)
    vae_decode  GPU   latents -> pixels; option emit_latents=true adds embeddings["bagel_latent"] [C, H/8, W/8]
To run the GPU stages on one actor, co-locate them in the job spec
(`stages: {lmm: {colocate: true}, vae_decode: {colocate: true}}`): co-located VAE stages
with the same device and vae_dtype share one AE.
Stage options: vae_transform / vit_transform ([max, min, stride], prepare); emit_latents
(vae_decode); vae_dtype (VAE stages; default: the stage dtype -- float32 is what the
reference app uses for the VAE); lmm: quantize (nf4 | int8, bitsandbytes on CUDA),
attention (split | masked, see modeling/bagel/attn.py), compile (bool).
Edit outputs take the input's resized size (row width/height are ignored); t2i sizes
must be multiples of 16, <= 1024.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.family import BatchFn, Row, RowError, StageContext, StageSpec

IMAGE_DEFAULTS: dict[str, Any] = {
    "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": [0.4, 1.0], "cfg_renorm_type": "global",
    "cfg_renorm_min": 0.0, "timestep_shift": 3.0, "num_timesteps": 50,
}
# think: reason (understand) or plan (t2i, edit) in text first, as the reference's think=True;
# the text settings apply to that text
TEXT_DEFAULTS: dict[str, Any] = {"think": False, "max_think_token_n": 1000, "do_sample": False, "text_temperature": 0.3}
DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {**IMAGE_DEFAULTS, "image_shapes": [1024, 1024], **TEXT_DEFAULTS},
    "edit": {**IMAGE_DEFAULTS, "cfg_img_scale": 2.0, "cfg_interval": [0.0, 1.0], "cfg_renorm_type": "text_channel",
             **TEXT_DEFAULTS},
    "understand": TEXT_DEFAULTS,
}
VAE_SEED_SALT = 0x5EED_BA6E  # the VAE posterior draws from its own stream of the sample seed
BIG_FIELDS = ("bagel_vae_pixels", "bagel_vit_patches", "bagel_vae_latent", "bagel_latent")


def _num(key: str, v: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and float(v) != int(v)):
        raise RowError("bad_params", f"{key} must be {'an integer' if integer else 'a number'}, got {v!r}")
    if not lo <= v <= hi:
        raise RowError("bad_params", f"{key} must be in [{lo}, {hi}], got {v!r}")
    return int(v) if integer else float(v)


def _check(task: str, key: str, v: Any) -> Any:
    if key in ("cfg_text_scale", "cfg_img_scale"):
        return _num(key, v, 0.0, 100.0)
    if key == "cfg_interval":
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise RowError("bad_params", f"cfg_interval must be [lo, hi], got {v!r}")
        lo, hi = (_num(key, x, 0.0, 1.0) for x in v)
        if lo > hi:
            raise RowError("bad_params", f"cfg_interval lo > hi: {v!r}")
        return [lo, hi]
    if key == "cfg_renorm_type":
        if v not in ("global", "channel", "text_channel"):
            raise RowError("bad_params", f"cfg_renorm_type must be global|channel|text_channel, got {v!r}")
        return v
    if key == "cfg_renorm_min":
        return _num(key, v, 0.0, 1.0)
    if key == "timestep_shift":
        return _num(key, v, 1e-3, 1000.0)
    if key == "num_timesteps":
        return _num(key, v, 2, 1000, integer=True)
    if key == "image_shapes":
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise RowError("bad_params", f"image_shapes must be [height, width], got {v!r}")
        return [_size(key, x) for x in v]
    if key == "max_think_token_n":
        return _num(key, v, 1, 32768, integer=True)
    if key in ("do_sample", "think"):
        if not isinstance(v, bool):
            raise RowError("bad_params", f"{key} must be true or false, got {v!r}")
        return v
    if key == "text_temperature":
        return _num(key, v, 1e-4, 100.0)
    raise AssertionError(key)


def _size(key: str, v: Any, stride: int = 16, limit: int = 1024) -> int:
    v = _num(key, v, stride, limit, integer=True)
    if v % stride:
        raise RowError("bad_params", f"{key} must be a multiple of {stride}, got {v}")
    return v


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


# ---- stages ------------------------------------------------------------------------------
def build_prepare(ctx: StageContext) -> BatchFn:
    from modeling.bagel.load import bagel_params, load_tokenizer
    from modeling.bagel.transforms import VAE_RULE, VIT_RULE, ResizeRule, prepare_image

    tok, _ = load_tokenizer(ctx.model_path)
    p = bagel_params(ctx.model_path)
    ds, limit = p.latent_downsample, p.latent_downsample * p.max_latent_size
    vae_rule = ResizeRule(*ctx.options["vae_transform"]) if "vae_transform" in ctx.options else VAE_RULE
    vit_rule = ResizeRule(*ctx.options["vit_transform"]) if "vit_transform" in ctx.options else VIT_RULE

    def prepare(row: Row) -> Row:
        from pipeline.inputs import load_image

        if row.get("negative_prompt"):
            raise RowError("bad_params", "bagel has no negative prompt (its CFG drops the prompt instead)")
        out: Row = {"bagel_prompt_ids": tok.encode(row.get("prompt") or ""), "bagel_vae_pixels": None,
                    "bagel_vit_patches": None, "bagel_vit_grid": None}
        task = row["task"]
        if task == "t2i":
            h, w = row["params"].get("image_shapes", [1024, 1024])
            h = _size("height", row["height"] if row.get("height") is not None else h, ds, limit)
            w = _size("width", row["width"] if row.get("width") is not None else w, ds, limit)
            out["bagel_size"] = [h, w]
            return out
        img = prepare_image(load_image(row.get("image")), vae_rule, vit_rule, vae=task == "edit")
        out.update(bagel_vit_patches=_to_np(img.vit_patches), bagel_vit_grid=list(img.vit_grid))
        if task == "edit":
            out["bagel_vae_pixels"] = _to_np(img.vae_pixels)
            out["bagel_size"] = list(img.vae_pixels.shape[-2:])
        return out

    return lambda rows: [prepare(r) for r in rows]


def _encode(ae, rows: list[Row]) -> list[Row]:
    outs: list[Row] = [{} for _ in rows]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r["task"] == "edit" and r.get("bagel_vae_latent") is None:
            groups.setdefault(tuple(r["bagel_vae_pixels"].shape), []).append(i)
    dev = ae.encoder.conv_in.weight.device
    for idx in groups.values():
        x = torch.stack([torch.from_numpy(np.asarray(rows[i]["bagel_vae_pixels"])) for i in idx]).to(dev)
        gens = [torch.Generator().manual_seed((int(rows[i]["sample_seed"]) ^ VAE_SEED_SALT) & (2**63 - 1)) for i in idx]
        with torch.inference_mode():
            z = ae.encode(x, gens)
        for i, zi in zip(idx, z):
            outs[i]["bagel_vae_latent"] = _to_np(zi)
    return outs


def decode_text(tok, special, ids: list[int]) -> str:
    """Generated ids -> text. The reference keeps only what precedes a second <|im_start|>."""
    if special.bos_token_id in ids:
        ids = ids[: ids.index(special.bos_token_id)]
    return tok.decode(ids)


def _lmm(model, tok, special, system: dict[str, list[int]], rows: list[Row], attention: str = "split") -> list[Row]:
    """Text first (understand rows, and the plans of thinking t2i/edit rows), then every image
    row's denoising together. system: the thinking prompts' ids, "understand" and "image"."""
    from modeling.bagel import sampling as S

    outs: list[Row] = [{} for _ in rows]
    inputs, txt = [], []
    for i, r in enumerate(rows):
        p = r["params"]
        vit = r.get("bagel_vit_patches")
        vit = torch.from_numpy(np.asarray(vit)) if vit is not None else None
        grid = tuple(r["bagel_vit_grid"]) if r.get("bagel_vit_grid") is not None else None
        lat = torch.from_numpy(np.asarray(r["bagel_vae_latent"])) if r["task"] == "edit" else None
        sys_ids = system["understand" if r["task"] == "understand" else "image"] if p["think"] else None
        inputs.append((vit, grid, lat, sys_ids))
        if r["task"] == "understand" or p["think"]:
            g = torch.Generator().manual_seed(int(r["sample_seed"]))
            txt.append((i, S.TextRow(r["bagel_prompt_ids"], vit, grid, int(p["max_think_token_n"]) - 1,
                                     bool(p["do_sample"]), float(p["text_temperature"]), g, sys_ids, lat)))
    if txt:
        for (i, _), ids in zip(txt, S.generate_text(model, [row for _, row in txt], special)):
            outs[i]["text"] = decode_text(tok, special, ids)
    img = []
    for i, (r, (vit, grid, lat, sys_ids)) in enumerate(zip(rows, inputs)):
        if r["task"] == "understand":
            continue
        p, (h, w) = r["params"], r["bagel_size"]
        ip = S.ImageParams(**{k: (tuple(v) if k == "cfg_interval" else v) for k, v in p.items() if k in IMAGE_DEFAULTS})
        noise = S.get_noise(model, h, w, torch.Generator().manual_seed(int(r["sample_seed"])))
        plan = tok.encode(outs[i]["text"]) if p["think"] else None  # the reference re-tokenises its decoded plan
        img.append((i, S.ImageRow(r["bagel_prompt_ids"], h, w, noise, ip, lat, vit, grid, sys_ids, plan)))
    if img:
        for (i, _), x in zip(img, S.denoise(model, [row for _, row in img], special, attention=attention)):
            outs[i]["bagel_latent"] = _to_np(x)
    return outs


def _decode(ae, model_params, rows: list[Row], emit: bool) -> list[Row]:
    from modeling.bagel.sampling import decode_to_uint8
    from modeling.bagel.transforms import unpatchify

    outs: list[Row] = []
    for r in rows:
        out: Row = {k: None for k in BIG_FIELDS if k != "bagel_latent"}
        if r["task"] != "understand":
            h, w = r["bagel_size"]
            ds = model_params.latent_downsample
            latent = unpatchify(torch.from_numpy(np.asarray(r["bagel_latent"])), h // ds, w // ds, model_params.latent_patch_size)
            out["pixels"] = decode_to_uint8(ae, latent).numpy()
            if emit:
                out["embeddings"] = {"bagel_latent": latent.numpy().astype(np.float32)}  # [C, H/8, W/8]
        out["bagel_latent"] = None
        outs.append(out)
    return outs


@functools.lru_cache(maxsize=2)
def _ae(model_path: str, device: str, dtype: str):
    """One AE per (model, device, dtype) in this process: co-located VAE stages share it."""
    from modeling.bagel.load import load_ae

    return load_ae(model_path, device, _dtype(dtype))


def _load_ae(ctx: StageContext):
    return _ae(ctx.model_path, ctx.device, ctx.options.get("vae_dtype", ctx.dtype))


def build_vae_encode(ctx: StageContext) -> BatchFn:
    ae = _load_ae(ctx)
    return lambda rows: _encode(ae, rows)


def build_lmm(ctx: StageContext) -> BatchFn:
    from modeling.bagel.load import load_bagel, load_tokenizer
    from modeling.bagel.quant import check_quantize, quantize_llm
    from modeling.bagel.sampling import THINK_GENERATE_PROMPT, THINK_UNDERSTAND_PROMPT

    quant = ctx.options.get("quantize")
    check_quantize(quant, ctx.device)  # before the weights load
    attn = ctx.options.get("attention", "split")
    if attn not in ("split", "masked"):
        raise ValueError(f"lmm option attention must be split or masked, got {attn!r}")
    tok, special = load_tokenizer(ctx.model_path)
    model = load_bagel(ctx.model_path, "cpu" if quant else ctx.device, _dtype(ctx.dtype))
    if quant:
        model = quantize_llm(model, quant, ctx.device)
    if ctx.options.get("compile"):
        model.compile_blocks()
    system = {"understand": tok.encode(THINK_UNDERSTAND_PROMPT), "image": tok.encode(THINK_GENERATE_PROMPT)}
    return lambda rows: _lmm(model, tok, special, system, rows, attn)


def build_vae_decode(ctx: StageContext) -> BatchFn:
    from modeling.bagel.load import bagel_params

    ae, p = _load_ae(ctx), bagel_params(ctx.model_path)
    emit = bool(ctx.options.get("emit_latents", False))
    return lambda rows: _decode(ae, p, rows, emit)


PREPARE = StageSpec("prepare", build_prepare, uses_gpu=False, default_batch_size=8)
VAE_ENCODE = StageSpec("vae_encode", build_vae_encode, default_batch_size=4)
LMM = StageSpec("lmm", build_lmm, default_batch_size=4)
VAE_DECODE = StageSpec("vae_decode", build_vae_decode, default_batch_size=4)


class BagelFamily:
    name = "bagel"
    tasks = frozenset({"t2i", "edit", "understand"})

    def stages(self, model_path: str | None = None) -> list[StageSpec]:
        return [PREPARE, VAE_ENCODE, LMM, VAE_DECODE]

    def params_for(self, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
        if task not in DEFAULTS:
            raise RowError("bad_params", f"bagel serves {sorted(DEFAULTS)}, not {task!r}")
        out = json.loads(json.dumps(DEFAULTS[task]))
        for k, v in (overrides or {}).items():
            if k not in out:
                raise RowError("bad_params", f"unknown {task} parameter {k!r} (known: {sorted(out)})")
            out[k] = _check(task, k, v)
        return out

    def model_name(self, model_path: str) -> str:
        return "bagel:" + (Path(model_path).name or "model")

    def model_fingerprint(self, model_path: str) -> str:
        d, h = Path(model_path), hashlib.sha256()
        for f in sorted(d.iterdir()) if d.is_dir() else [d]:
            if not f.is_file():
                continue
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
            if f.suffix in (".json", ".txt") and f.stat().st_size < 64 << 20:
                h.update(f.read_bytes())
        return h.hexdigest()[:16]


FAMILY = BagelFamily()
