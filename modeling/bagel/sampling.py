"""BAGEL sampling as free functions: contexts -> prefill once -> batched Euler denoising /
batched text decoding. Rows of a batch may differ in prompt, size, task and every CFG
setting; each denoising step is one model forward over every row's active branches.

Contexts (see context.py) are prefilled once into one KV cache and only read while
denoising; text decoding appends to its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from modeling.bagel.context import Contexts
from modeling.bagel.layers import make_plan
from modeling.bagel.load import SpecialTokens
from modeling.bagel.model import Bagel
from modeling.bagel.transforms import grid_ids, unpatchify

RENORM_TYPES = ("global", "channel", "text_channel")
# Thinking mode: the reference's system prompts, put before everything else in the context.
# Understanding reasons before it answers; generation writes a plan, which joins the context
# of the image's conditional branch.
THINK_UNDERSTAND_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> answer here")
THINK_GENERATE_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> image here")


@dataclass(frozen=True)
class ImageParams:
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    # Step cache (approximate, off at 1): the model runs on every step_cache_interval-th step
    # only; between, each row's guided velocity is extrapolated to first order in t from its
    # last two computed ones (TaylorSeer's idea, on the model's output). The first
    # step_cache_warmup steps, and two steps after CFG turns on or off, are always computed.
    step_cache_interval: int = 1
    step_cache_warmup: int = 3

    def __post_init__(self):
        if self.step_cache_interval < 1 or self.step_cache_warmup < 2:
            raise ValueError(f"step_cache_interval must be >= 1 and step_cache_warmup >= 2, got "
                             f"{self.step_cache_interval}, {self.step_cache_warmup}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if len(self.cfg_interval) != 2:
            raise ValueError(f"cfg_interval must be [lo, hi], got {self.cfg_interval}")


T2I_DEFAULTS = ImageParams()
EDIT_DEFAULTS = ImageParams(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


@dataclass
class ImageRow:
    prompt_ids: list[int]
    height: int
    width: int
    noise: Tensor  # [h * w, p * p * C] packed initial noise
    params: ImageParams = T2I_DEFAULTS
    vae_latent: Tensor | None = None  # edit: clean scaled latent [C, H/8, W/8]
    vit_patches: Tensor | None = None  # edit: [n, 3 * 14 * 14]
    vit_grid: tuple[int, int] | None = None
    system_ids: list[int] | None = None  # thinking: THINK_GENERATE_PROMPT's ids
    plan_ids: list[int] | None = None  # thinking: the generated plan's ids


@dataclass
class TextRow:
    prompt_ids: list[int]
    vit_patches: Tensor | None = None
    vit_grid: tuple[int, int] | None = None
    max_new_tokens: int = 999
    do_sample: bool = False
    temperature: float = 0.3
    generator: torch.Generator | None = None
    system_ids: list[int] | None = None  # thinking: the system prompt's ids
    vae_latent: Tensor | None = None  # planning an edit: the input's clean latent, as in its image context


def text_context(row: TextRow) -> list:
    """[system prompt] + [VAE image] + [ViT image] + prompt: what the text is generated after."""
    ctx = [("text", row.system_ids)] if row.system_ids is not None else []
    if row.vae_latent is not None:
        ctx.append(("vae", row.vae_latent))
    if row.vit_patches is not None:
        ctx.append(("vit", row.vit_patches, row.vit_grid))
    return ctx + [("text", row.prompt_ids)]


def get_noise(model: Bagel, height: int, width: int, generator: torch.Generator) -> Tensor:
    p = model.params
    h, w = latent_grid(model, height, width)
    return torch.randn(h * w, p.patch_latent_dim, generator=generator, device=generator.device)


def latent_grid(model: Bagel, height: int, width: int) -> tuple[int, int]:
    ds = model.params.latent_downsample
    if height % ds or width % ds or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {ds}")
    return height // ds, width // ds


def schedule(num_timesteps: int, shift: float) -> tuple[Tensor, Tensor]:
    """(t, dt): the shifted times the model is evaluated at and the Euler step sizes."""
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1], t[:-1] - t[1:]


def image_contexts(row: ImageRow) -> dict[str, list]:
    """gen = full context (with the plan when thinking); text = without the prompt (CFG-text);
    img = without the images (CFG-img). The system prompt, when thinking, leads all three."""
    system = [("text", row.system_ids)] if row.system_ids is not None else []
    text = [("text", row.prompt_ids)]
    plan = [("text", row.plan_ids)] if row.plan_ids is not None else []
    images = []
    if row.vae_latent is not None:
        images.append(("vae", row.vae_latent))
    if row.vit_patches is not None:
        images.append(("vit", row.vit_patches, row.vit_grid))
    return {"gen": system + images + text + plan, "text": system + images, "img": system + text}


def _combine(v: Tensor, u_text: Tensor | None, u_img: Tensor | None, p: ImageParams) -> Tensor:
    """Per-sample CFG with renorm. v, u_*: [n, C] float32."""
    if u_text is None:
        return v
    lo = p.cfg_renorm_min
    vt = u_text + p.cfg_text_scale * (v - u_text)
    if p.cfg_renorm_type == "text_channel":
        scale = (v.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(lo, 1.0)
        vt = vt * scale
        return vt if u_img is None else u_img + p.cfg_img_scale * (vt - u_img)
    out = vt if u_img is None else u_img + p.cfg_img_scale * (vt - u_img)
    dims = dict(dim=-1, keepdim=True) if p.cfg_renorm_type == "channel" else {}
    scale = (v.norm(**dims) / (out.norm(**dims) + 1e-8)).clamp(lo, 1.0)
    return out * scale


def _branches(p: ImageParams, t: Tensor) -> list[str]:
    lo, hi = p.cfg_interval
    if not (bool(t > lo) and bool(t <= hi)) or p.cfg_text_scale <= 1.0:
        return ["gen"]
    return ["gen", "text"] + (["img"] if p.cfg_img_scale > 1.0 else [])


@dataclass
class StepCache:
    """One row's computed velocities for ImageParams.step_cache_interval > 1."""

    interval: int
    warmup: int
    branches: tuple[str, ...] = ()  # the CFG branches the velocities in `seen` were computed with
    seen: list[tuple[float, Tensor]] = field(default_factory=list)  # (t, v) of the last two computed steps
    last: int = -1  # the last computed step

    def computes(self, step: int, branches: tuple[str, ...]) -> bool:
        # a change of branches changes what the velocity is: extrapolating across it would be wrong
        return (self.interval <= 1 or step < self.warmup or branches != self.branches or len(self.seen) < 2
                or step - self.last >= self.interval)

    def record(self, step: int, t: float, branches: tuple[str, ...], v: Tensor) -> None:
        if self.interval <= 1:
            return
        if branches != self.branches:
            self.branches, self.seen = branches, []
        self.seen = self.seen[-1:] + [(t, v)]
        self.last = step

    def predict(self, t: float) -> Tensor:
        (t0, v0), (t1, v1) = self.seen
        return v1 + (v1 - v0) * ((t - t1) / (t1 - t0))


@torch.inference_mode()
def denoise(model: Bagel, rows: list[ImageRow], special: SpecialTokens, attention: str = "split") -> list[Tensor]:
    """Run every row's Euler loop together; returns each row's final packed latents [n, C].
    attention: "split" (context and image attention merged by log-sum-exp; the image part
    runs unmasked) or "masked" (one key-masked attention over context + image).
    A row whose step cache skips a step (ImageParams.step_cache_interval) takes no part in that
    step's forward; a step every row skips runs none."""
    if attention not in ("split", "masked"):
        raise ValueError(f"attention must be split or masked, got {attention!r}")
    dev, P = model.vae2llm.weight.device, model.params
    grids = [latent_grid(model, r.height, r.width) for r in rows]
    for r, (h, w) in zip(rows, grids):
        if tuple(r.noise.shape) != (h * w, P.patch_latent_dim):
            raise ValueError(f"noise {tuple(r.noise.shape)} does not fit {r.height}x{r.width}")
    ctx_of, contexts = {}, []
    for i, r in enumerate(rows):
        for name, ctx in image_contexts(r).items():
            needed = name == "gen" or (r.params.cfg_text_scale > 1.0 and (name == "text" or r.params.cfg_img_scale > 1.0))
            if needed:
                ctx_of[i, name] = len(contexts)
                contexts.append(ctx)
    ctx = Contexts(model, contexts, special, share=True)
    scheds = [schedule(r.params.num_timesteps, r.params.timestep_shift) for r in rows]
    xs = [r.noise.to(dev, torch.float32) for r in rows]
    pos_ids = [grid_ids(h, w, P.max_latent_size).to(dev) for h, w in grids]
    ends = model.embed_text(torch.tensor([special.start_of_image, special.end_of_image], device=dev))
    caches = [StepCache(r.params.step_cache_interval, r.params.step_cache_warmup) for r in rows]
    plans = {}
    for step in range(max(len(t) for t, _ in scheds)):
        seqs, skipped = [], []  # (row, branch) to compute; rows whose velocity is extrapolated
        for i, (t, _) in enumerate(scheds):
            if step < len(t):
                branches = tuple(_branches(rows[i].params, t[step]))
                if caches[i].computes(step, branches):
                    seqs += [(i, b) for b in branches]
                else:
                    skipped.append(i)
        for i in skipped:
            xs[i] = xs[i] - caches[i].predict(float(scheds[i][0][step])) * scheds[i][1][step].to(dev)
        if not seqs:
            continue
        emb = {}
        for i in {i for i, _ in seqs}:
            t = scheds[i][0][step].to(dev)
            lat = model.embed_latents(xs[i], t.expand(xs[i].shape[0]), pos_ids[i])
            emb[i] = torch.cat([ends[:1], lat.to(ends.dtype), ends[1:]])
        lens = [emb[i].shape[0] for i, _ in seqs]
        cids = [ctx_of[i, b] for i, b in seqs]
        key = (tuple(lens), tuple(cids))
        if key not in plans:  # the batch's shape changes only when a row's CFG turns on/off or it ends
            plans.clear()
            plan = make_plan(lens, ctx_lens=[ctx.lens[c] for c in cids], rows=[ctx.row[c] for c in cids],
                             split=attention == "split", device=dev)
            pos = torch.cat([torch.full((n,), ctx.rope[c], device=dev) for n, c in zip(lens, cids)])
            gen = torch.ones(sum(lens), dtype=torch.bool, device=dev)
            ends_at = torch.tensor(lens, device=dev).cumsum(0)
            gen[ends_at - 1] = False
            gen[ends_at - torch.tensor(lens, device=dev)] = False
            plans[key] = plan, pos, gen
        plan, pos, gen = plans[key]
        h = torch.cat([emb[i] for i, _ in seqs])
        out = model(h, pos, plan, gen, ctx.cache)
        v_all = model.llm2vae(out[gen]).float().split([n - 2 for n in lens])
        by_row: dict[int, dict[str, Tensor]] = {}
        for (i, b), v in zip(seqs, v_all):
            by_row.setdefault(i, {})[b] = v
        for i, vs in by_row.items():
            v = _combine(vs["gen"], vs.get("text"), vs.get("img"), rows[i].params)
            caches[i].record(step, float(scheds[i][0][step]), tuple(vs), v)
            xs[i] = xs[i] - v * scheds[i][1][step].to(dev)
    return xs


@torch.inference_mode()
def generate_text(model: Bagel, rows: list[TextRow], special: SpecialTokens) -> list[list[int]]:
    """Greedy or sampled decoding after each row's text_context; ids exclude bos/eos."""
    dev = model.vae2llm.weight.device
    contexts = [text_context(r) for r in rows]
    steps = max(r.max_new_tokens for r in rows)
    ctx = Contexts(model, contexts, special, extra=steps + 1)
    outs: list[list[int]] = [[] for _ in rows]
    cur = [special.bos_token_id] * len(rows)
    pos = list(ctx.rope)
    live = [i for i, r in enumerate(rows) if r.max_new_tokens > 0]
    while live:
        plan = make_plan([1] * len(live), ctx_lens=[ctx.cache.lens[i] for i in live], rows=live, causal=True,
                         write=True, device=dev)
        h = model.embed_text(torch.tensor([cur[i] for i in live], device=dev))
        out = model(h, torch.tensor([pos[i] for i in live], device=dev), plan, None, ctx.cache)
        logits = model.language_model.lm_head(out).float().cpu()
        nxt = []
        for j, i in enumerate(live):
            ctx.cache.lens[i] += 1
            pos[i] += 1
            r = rows[i]
            if r.do_sample:
                probs = torch.softmax(logits[j] / r.temperature, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=r.generator))
            else:
                tok = int(logits[j].argmax())
            if tok == special.eos_token_id:
                continue
            outs[i].append(tok)
            cur[i] = tok
            if len(outs[i]) < r.max_new_tokens:
                nxt.append(i)
        live = nxt
    return outs


def unpack_latent(model: Bagel, x: Tensor, height: int, width: int) -> Tensor:
    """Packed [h * w, p * p * C] -> VAE latent [C, h * p, w * p]."""
    h, w = latent_grid(model, height, width)
    return unpatchify(x, h, w, model.params.latent_patch_size)


@torch.inference_mode()
def decode_to_uint8(ae, latent: Tensor) -> Tensor:
    """latent [C, h, w] -> uint8 [H, W, 3] (truncation, as the reference)."""
    img = ae.decode(latent[None].to(ae.decoder.conv_in.weight.device)).float()
    return ((img * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0) * 255).to(torch.uint8).cpu()


__all__ = [
    "ImageParams", "ImageRow", "TextRow", "T2I_DEFAULTS", "EDIT_DEFAULTS", "schedule", "denoise",
    "generate_text", "text_context", "THINK_UNDERSTAND_PROMPT", "THINK_GENERATE_PROMPT", "get_noise", "unpack_latent", "decode_to_uint8", "image_contexts", "replace", "Contexts",
]
