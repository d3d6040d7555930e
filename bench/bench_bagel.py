"""Throughput of BAGEL-7B-MoT t2i / edit with random weights built directly on the GPU.

    python bench/bench_bagel.py                       # 512^2 and 1024^2, batch 1/4/8, 50 steps, + one edit
    python bench/bench_bagel.py --tiny                # tiny model on CPU (smoke test)
    python bench/bench_bagel.py --sizes 1024 --batch-sizes 8 --steps 10
    python bench/bench_bagel.py --sizes 1024 --batch-sizes 8 --attention masked split --no-edit --compare
                                                      # old (masked) vs new (split) attention, same run

--attention: "split" (default: context and image attention merged by log-sum-exp, the
image part unmasked), "split:KERNEL" (try KERNEL first for the image part: cudnn, flash,
efficient, ...) or "masked" (the earlier single key-masked attention); several modes run
one after another on the same weights; the kernels that passed their self-check are printed
at the end. --compile: torch.compile the LLM layers' norms, RoPE and MLPs. --compare: before
timing, the relative L2 distance between the final latents of each mode and the first one
(largest size, batch 2, <= 10 steps), beside the batched-vs-alone noise floor.
--attention-micro: first, one layer's attention alone per mode (largest size and batch, CFG on).
--profile: after the timings, torch.profiler over one CFG denoising forward at the largest size and
batch (bench/profile_bagel_step.py). --reference PATH: then the reference's own inferencer
(ByteDance-Seed/Bagel copied to PATH; its bench from --ref-tools, default .bagel-tools/) at the
same sizes and steps, batch 1, in a subprocess on the same GPU, and the ratio (bench/bagel_ref.py);
unless --no-edit, also the reference's edit of an image of the largest size (bench/bagel_ref_edit.py)
beside genfleet's edit row (--edit-batch edits per batch).
--approx VARIANT...: then the optional approximate speed-ups at the largest size and batch, each
beside the exact path's run at that size and batch in the table above: fp8 (the LLM's decoder GEMMs in FP8,
modeling/bagel/quant.py), cache:N (the step cache: the model every Nth step) or fp8+cache:N;
with each one's drift from the exact path at the same seeds (final latents' relative L2, decoded
images' PSNR). FP8 converts the model in place, so fp8 variants run after the bf16 ones.

Each row of a batch has its own prompt and noise; sampler settings are the reference
notebook's (t2i: cfg_text 4, cfg_img 1, interval [0.4, 1], global renorm, shift 3; edit:
cfg_text 4, cfg_img 2, interval [0, 1], text_channel). Timed: context prefill, the
denoising loop and the VAE decode (and VAE encode for edit) -- not image I/O.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bagel_ref  # noqa: E402  (bench/, beside this file)
from profile_bagel_step import profile_step  # noqa: E402

from modeling.bagel import attn  # noqa: E402
from modeling.bagel import sampling as S
from modeling.bagel.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from modeling.bagel.load import SpecialTokens  # noqa: E402
from modeling.bagel.model import PRESETS, Bagel, sincos_2d  # noqa: E402
from modeling.bagel.tiny import TINY_AE, tiny_params  # noqa: E402
from modeling.bagel.transforms import VAE_RULE, VIT_RULE, ResizeRule, prepare_image  # noqa: E402

SPECIAL = SpecialTokens(1, 2, 3, 4)


def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, t in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                t.fill_(1.0)
            elif name.endswith("pos_embed"):
                side = int(t.shape[0] ** 0.5)
                t.copy_(sincos_2d(side, t.shape[1]))
            elif t.ndim >= 2:
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.zero_()


def build(tiny: bool, device: str, dtype: torch.dtype, vae_dtype: torch.dtype):
    p = tiny_params(512) if tiny else PRESETS["bagel-7b-mot"]
    ap = TINY_AE if tiny else AutoEncoderParams()
    with torch.device("meta"):
        model, ae = Bagel(p).to(dtype), AutoEncoder(ap).to(vae_dtype)
    model, ae = model.to_empty(device=device), ae.to_empty(device=device)
    random_init_(model, 0)
    random_init_(ae, 1)
    return model.eval().requires_grad_(False), ae.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(model: Bagel, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = min(model.params.vocab_size, 150000)
    return [torch.randint(10, vocab, (int(torch.randint(12, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def t2i_rows(model, size: int, batch: int, steps: int, seed: int = 0, **params) -> list:
    return [
        S.ImageRow(ids, size, size, S.get_noise(model, size, size, torch.Generator().manual_seed(seed + i)),
                   S.replace(S.T2I_DEFAULTS, num_timesteps=steps, **params))
        for i, ids in enumerate(prompts(model, batch, seed))
    ]


def run_t2i(model, ae, size: int, batch: int, steps: int, attention: str = "split", seed: int = 0,
            **params) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's (final packed latents, decoded uint8 image)."""
    return [(x, S.decode_to_uint8(ae, S.unpack_latent(model, x, size, size)))
            for x in S.denoise(model, t2i_rows(model, size, batch, steps, seed, **params), SPECIAL, attention=attention)]


DEFAULT_ORDER = list(attn.UNMASKED_ORDER)


def attention_mode(mode: str) -> str:
    name, _, kernel = mode.partition(":")
    if name not in ("masked", "split") or (kernel and (name != "split" or kernel not in attn.KERNELS)):
        raise argparse.ArgumentTypeError(f"expected masked, split or split:KERNEL ({', '.join(attn.KERNELS)}), got {mode!r}")
    return mode


def use(mode: str) -> str:
    """Set the kernel order for `mode`; returns denoise's attention argument."""
    name, _, kernel = mode.partition(":")
    attn.UNMASKED_ORDER[:] = ([kernel] if kernel else []) + [k for k in DEFAULT_ORDER if k != kernel]
    return name


def attention_micro(p, modes: list[str], size: int, batch: int, device: str, dtype: torch.dtype, iters: int = 20) -> None:
    """Time one layer's attention of a CFG denoising step (batch rows: conditional branch with
    a 14..42-token prompt context, CFG-text branch with none) for each mode."""
    from modeling.bagel.layers import KVCache, attention, make_plan

    g = torch.Generator().manual_seed(0)
    n = (size // p.latent_downsample) ** 2 + 2
    ctx = [int(torch.randint(14, 43, (1,), generator=g)) for _ in range(batch)] + [0] * batch
    rows = list(range(batch)) + [batch] * batch
    cache = KVCache(1, ctx[:batch] + [0], p.num_kv_heads, p.head_dim, device, dtype)
    cache.k[0].normal_()
    cache.v[0].normal_()
    N = n * 2 * batch
    q = torch.randn(N, p.num_heads, p.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(N, p.num_kv_heads, p.head_dim, device=device, dtype=dtype) for _ in range(2))
    for label in modes:
        plan = make_plan([n] * 2 * batch, ctx_lens=ctx, rows=rows, split=use(label) == "split", device=device)
        with torch.inference_mode():
            attention(q, k, v, plan, cache, 0)  # self-checks, warm-up
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                attention(q, k, v, plan, cache, 0)
            sync(device)
        ms = 1000 * (time.perf_counter() - t0) / iters
        print(f"# attention of one layer, {size}² batch {batch} with CFG ({2 * batch} x {n} tokens), {label}: "
              f"{ms:.2f} ms (x {p.num_layers} layers = {ms * p.num_layers:.0f} ms per step)", flush=True)


def compare(model, modes: list[str], size: int, steps: int) -> None:
    rows = t2i_rows(model, size, 2, steps, seed=5)
    ref = S.denoise(model, rows, SPECIAL, attention=use(modes[0]))
    alone = [S.denoise(model, [r], SPECIAL, attention=use(modes[0]))[0] for r in rows]
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(alone, ref))
    print(f"# {modes[0]}, rows alone vs batched: final latents rel L2 {rel:.2e} (the noise floor of this dtype)", flush=True)
    for mode in modes[1:]:
        got = S.denoise(model, rows, SPECIAL, attention=use(mode))
        rel = max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
        print(f"# {mode} vs {modes[0]}: final latents rel L2 {rel:.2e} ({size}², batch 2, {steps} steps)", flush=True)


def approx_variant(v: str) -> str:
    parts = v.split("+")
    ok = len(parts) == len(set(p.partition(":")[0] for p in parts)) and all(
        p == "fp8" or (p.startswith("cache:") and p[6:].isdigit() and int(p[6:]) >= 2) for p in parts)
    if not ok:
        raise argparse.ArgumentTypeError(f"expected fp8, cache:N (N >= 2) or fp8+cache:N, got {v!r}")
    return v


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def fp8_gemm_micro(p, tokens: int, device: str, compiled: bool, iters: int = 20) -> None:
    """One MLP up-projection of a CFG step ([tokens, D] x [D, 4D']) in bf16 and through
    Fp8Linear (its per-token activation quantisation included): the ceiling of FP8's gain."""
    from modeling.bagel.quant import Fp8Linear

    lin = torch.nn.Linear(p.hidden_size, p.intermediate_size, bias=False, device=device, dtype=torch.bfloat16)
    fp8 = Fp8Linear(lin, device)
    if compiled:
        fp8.compile(dynamic=True)
    x = torch.randn(tokens, p.hidden_size, device=device, dtype=torch.bfloat16)
    flop = 2 * tokens * p.hidden_size * p.intermediate_size
    for name, f in (("bf16", lin), ("fp8", fp8)):
        with torch.inference_mode():
            f(x)
            dt, _ = measure(lambda: [f(x) for _ in range(iters)], device)
        print(f"# {name} GEMM [{tokens}, {p.hidden_size}] x [{p.hidden_size}, {p.intermediate_size}]: "
              f"{1000 * dt / iters:.2f} ms, {flop * iters / dt / 1e12:.0f} TFLOP/s", flush=True)


def approx(model, ae, variants: list[str], size: int, batch: int, steps: int, mode: str, compiled: bool,
           device: str, exact: tuple[float, list]) -> None:
    """Time each variant beside the exact path (same seeds, same warm state; `exact`: its time
    and outputs from the main table) and print its drift."""
    from modeling.bagel.quant import quantize_llm

    def timed(**params):
        if compiled:
            run_t2i(model, ae, size, batch, 6, mode, **params)  # (re)compile for these shapes first
        out: list = []
        dt, _ = measure(lambda: out.extend(run_t2i(model, ae, size, batch, steps, mode, **params)), device)
        return dt, out

    if any("fp8" in v for v in variants):
        fp8_gemm_micro(model.params, batch * 2 * ((size // model.params.latent_downsample) ** 2 + 2), device, compiled)
    print("\n| variant | size | batch | s/image | images/hour | x exact | latents rel L2 (max) | PSNR dB (min / mean) |")
    print("|---|---|---|---|---|---|---|---|")
    dt0, exact_out = exact
    print(f"| exact | {size}² | {batch} | {dt0 / batch:.2f} | {3600 * batch / dt0:.0f} | 1.00 | 0 | inf |", flush=True)
    quantised = False
    for v in sorted(variants, key=lambda v: "fp8" in v):  # bf16 variants before the in-place FP8 conversion
        if "fp8" in v and not quantised:
            quantize_llm(model, "fp8", device)
            if compiled:
                torch._dynamo.reset()  # the compiled MLPs held the bf16 Linears
                model.compile_blocks()
            quantised = True
        interval = next((int(p[6:]) for p in v.split("+") if p.startswith("cache:")), 1)
        dt, out = timed(step_cache_interval=interval)
        rel = max(float((x - x0).norm() / x0.norm()) for (x, _), (x0, _) in zip(out, exact_out))
        p = [psnr(img, img0) for (_, img), (_, img0) in zip(out, exact_out)]
        print(f"| {v} | {size}² | {batch} | {dt / batch:.2f} | {3600 * batch / dt:.0f} | {dt0 / dt:.2f} | {rel:.2e} "
              f"| {min(p):.1f} / {sum(p) / len(p):.1f} |", flush=True)


def run_edit(model, ae, size: int, steps: int, vae_rule: ResizeRule, vit_rule: ResizeRule, attention: str = "split",
             batch: int = 1) -> None:
    """`batch` edits of size x size noise images, each with its own instruction, in one denoise."""
    from PIL import Image

    dev = model.vae2llm.weight.device
    rows = []
    for i, ids in enumerate(prompts(model, batch, 99)):
        prep = prepare_image(Image.effect_noise((size, size), 64 + i).convert("RGB"), vae_rule, vit_rule)
        with torch.inference_mode():
            lat = ae.encode(prep.vae_pixels[None].to(dev), [torch.Generator().manual_seed(i)])[0]
        H, W = prep.vae_pixels.shape[-2:]
        rows.append(S.ImageRow(ids, H, W, S.get_noise(model, H, W, torch.Generator().manual_seed(i)),
                               S.replace(S.EDIT_DEFAULTS, num_timesteps=steps), lat, prep.vit_patches, prep.vit_grid))
    for row, x in zip(rows, S.denoise(model, rows, SPECIAL, attention=attention)):
        S.decode_to_uint8(ae, S.unpack_latent(model, x, row.height, row.width))


def measure(fn, device: str) -> tuple[float, float]:
    """(seconds, peak GiB) of one call."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return dt, peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU (smoke test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--vae-dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-edit", action="store_true")
    ap.add_argument("--edit-batch", type=int, default=1, help="edits per batch (input images of the largest size)")
    ap.add_argument("--attention", nargs="+", default=["split"], type=attention_mode,
                    help="masked | split | split:KERNEL (KERNEL first for the unmasked image part: "
                         + ", ".join(attn.UNMASKED_ORDER) + ")")
    ap.add_argument("--compile", action="store_true", help="torch.compile the LLM layers' norms, RoPE and MLPs")
    ap.add_argument("--attention-micro", action="store_true",
                    help="first time one layer's attention alone for each --attention mode (largest size and batch)")
    ap.add_argument("--compare", action="store_true", help="print how far each --attention mode's latents are from the first's")
    ap.add_argument("--profile", action="store_true", help="profile one CFG denoising forward (largest size and batch)")
    ap.add_argument("--approx", nargs="+", default=[], type=approx_variant, metavar="VARIANT",
                    help="then fp8 | cache:N | fp8+cache:N beside the exact path, with their drift (largest size and batch)")
    ap.add_argument("--reference", default=None, metavar="PATH",
                    help="then time the reference (ByteDance-Seed/Bagel's modeling/, data/, inferencer.py at PATH)")
    ap.add_argument("--ref-tools", default=None, metavar="DIR",
                    help="the reference bench (shared/tools/bagel-ref copied; default .bagel-tools/)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    sizes = args.sizes or ([32, 64] if args.tiny else [512, 1024])
    batches = args.batch_sizes or ([1, 2] if args.tiny else [1, 4, 8])
    steps = args.steps or (4 if args.tiny else 50)
    vae_rule, vit_rule = (ResizeRule(64, 32, 16), ResizeRule(56, 28, 14)) if args.tiny else (VAE_RULE, VIT_RULE)
    tools = bagel_ref.find_tools(args.ref_tools) if args.reference else None

    t0 = time.perf_counter()
    model, ae = build(args.tiny, device, dtype, getattr(torch, args.vae_dtype))
    if args.compile:
        model.compile_blocks()
    sync(device)
    name = "tiny" if args.tiny else "BAGEL-7B-MoT (random weights)"
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"# {name}, {dtype}, VAE {args.vae_dtype}, {gpu}; built in {time.perf_counter() - t0:.1f}s; {steps} steps"
          f"{'; compiled norms/RoPE/MLPs' if args.compile else ''}\n")
    if args.attention_micro:
        attention_micro(model.params, args.attention, max(sizes), max(batches), device, dtype)
    if args.compare:
        compare(model, args.attention, max(sizes), min(steps, 10))
    ours: dict[tuple[int, int, str], float] = {}
    ours_edit: dict[tuple[int, int, str], float] = {}
    print("| task | size | batch | s/batch | s/image | images/hour | ms/step (batch) | peak GiB | attention |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in args.attention:
        mode = use(label)
        for size in sizes:
            run_t2i(model, ae, size, 1, 2, mode)  # warm-up (kernels, allocator, compiled graphs)
            for b in batches:
                if args.compile:  # compile (and recompile for this batch's shapes, CFG on and off) before timing
                    run_t2i(model, ae, size, b, 6, mode)
                out: list = []
                dt, peak = measure(lambda: out.extend(run_t2i(model, ae, size, b, steps, mode)), device)
                ours[size, b, label] = dt / b
                if (size, b) == (max(sizes), max(batches)):
                    exact = dt, out  # --approx's baseline (the last mode's)
                print(f"| t2i | {size}² | {b} | {dt:.2f} | {dt / b:.2f} | {3600 * b / dt:.0f} | {1000 * dt / (steps - 1):.0f} "
                      f"| {peak:.1f} | {label} |", flush=True)
        if not args.no_edit:
            size, eb = max(sizes), args.edit_batch
            run_edit(model, ae, size, 2, vae_rule, vit_rule, mode)
            if args.compile:
                run_edit(model, ae, size, 6, vae_rule, vit_rule, mode, eb)
            dt, peak = measure(lambda: run_edit(model, ae, size, steps, vae_rule, vit_rule, mode, eb), device)
            ours_edit[size, eb, label] = dt / eb
            print(f"| edit | {size}² in | {eb} | {dt:.2f} | {dt / eb:.2f} | {3600 * eb / dt:.0f} | {1000 * dt / (steps - 1):.0f} "
                  f"| {peak:.1f} | {label} |", flush=True)
    print(f"\n# attention kernels (self-checked against the math): {attn.kernels_checked() or 'none used (CPU: math)'}")
    if args.profile:
        size, b = max(sizes), max(batches)
        profile_step(model, t2i_rows(model, size, b, 4, seed=7), SPECIAL, use(args.attention[-1]), S.denoise)
        print(f"# measured above: {1000 * ours[size, b, args.attention[-1]] * b / (steps - 1):.0f} ms per step "
              f"(whole loop incl. prefill and VAE decode, / {steps - 1})", flush=True)
    if args.approx:
        approx(model, ae, args.approx, max(sizes), max(batches), steps, use(args.attention[-1]), args.compile, device,
               exact)
    if args.reference:
        del model, ae  # the reference builds its own model: give it the GPU's memory
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        ref = bagel_ref.run_reference(Path(args.reference), tools, sizes, steps, args.tiny)
        ref_edit = {} if args.no_edit else bagel_ref.run_reference_edit(Path(args.reference), tools, max(sizes), steps,
                                                                         args.tiny)
        bagel_ref.print_comparison(ours, ref, steps)
        if not args.no_edit:
            bagel_ref.print_comparison(ours_edit, ref_edit, steps, task="edit")
        if len(ref) < len(sizes) or (not args.no_edit and not ref_edit):
            print(f"# reference figures missing: t2i sizes {sorted(set(sizes) - set(ref))}"
                  f"{'' if args.no_edit or ref_edit else ', edit'}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
