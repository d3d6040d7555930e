"""Emu2-Gen / Emu1 GPU benchmark: genfleet's KV-cached batched loop and t2i vs the public reference, same run.

    python bench/bench_emu.py --reference .emu-ref --ref-stubs bench/emu_ref_stubs   # both models, both sides
    python bench/bench_emu.py --models emu2 --no-t2i                              # genfleet only, AR stage only
    python bench/bench_emu.py --tiny [--reference .emu-ref --ref-stubs ...]       # tiny shapes on CPU (smoke test)

Random weights at the released sizes, built on the meta device and drawn directly on the GPU in bf16
(N(0, 0.5/sqrt(fan_in)) for the encoder, N(0, 1/sqrt(fan_in)) for unet / VAE / safety checker; norms 1,
biases 0). With --reference the reference's own modules (bench/emu_ref_adapter.py) *share* these weight
tensors, so both sides compute the same functions and the GPU holds one copy.

Measured, per model (Emu2-Gen: 64 embeddings, 1024², Euler 50, guidance 3; Emu1: 32 embeddings, 512²,
PNDM 50, guidance 7.5):
  AR    the autoregressive stage. genfleet: B prompt rows and the "" guidance row regressed together
        (one prefill + n-1 single-token steps, `--ar-steps eager graph compile`: the step run eagerly, as a
        CUDA graph, or torch.compile'd). Reference: its `_prepare_and_encode_inputs` per prompt at batch 1
        (n whole-sequence forwards; Emu2 caches its "" branch after the first call, Emu1 runs [prompt, ""]
        in every call). rows/s.
  t2i   the whole text-to-image. genfleet: B rows through AR, `diffusion.denoise` (CFG batched), VAE decode
        (chunks of --vae-chunk) and the safety checker. Reference: its pipeline's forward at batch 1.
        images/hour.
Each timed figure follows a warm-up; the reference's rows/images are few (it is slow), genfleet's batches
large. The last lines are a markdown table of every figure with the ratio to the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference pipelines wrap their loops in tqdm
sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.emu import diffusion as D  # noqa: E402
from modeling.emu.config import PRESETS  # noqa: E402
from modeling.emu.decoder import DEFAULTS, EmuDecoder, build_safety_checker, build_unet, build_vae  # noqa: E402
from modeling.emu.decoder_presets import RELEASED, tiny_configs  # noqa: E402
from modeling.emu.encoder import Emu1Encoder, Emu2Encoder  # noqa: E402
from modeling.emu.regress import GraphedStep, decode_step, prompt_inputs, regress  # noqa: E402
from modeling.emu.tiny import tiny_emu1, tiny_emu2  # noqa: E402
from modeling.emu.tokens import EmuTokenizer, SpecialIds  # noqa: E402

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "an impressionist painting of a small red boat on a river at sunset",
    "a bowl of fruit, apples and pears, on a wooden table, soft light",
    "a watercolor painting of a mountain lake at sunrise, digital art, high quality",
    "a cat wearing a pair of glasses sitting on a sofa",
    "the skyline of a futuristic city at night, neon lights reflected in the rain, cinematic",
    "a red cube on a glass table",
    "portrait of an old fisherman with a grey beard, oil painting, dramatic lighting, detailed",
    "a corgi running on the beach",
    "an isometric illustration of a cozy library with tall bookshelves and a fireplace",
    "a bowl of ramen with an egg and green onions, studio photo",
    "a lighthouse on a cliff during a storm, huge waves crashing against the rocks",
]
# both references' ids: Emu2's added tokens and Emu1's appended ones start [PAD] [IMG] [/IMG] <image> at 32000
SPECIAL = SpecialIds(bos=1, pad=32000, boi=32001, eoi=32002, image=32003)
VOCAB = {"emu2": 32272, "emu1": 32004}
SCALE = {"encoder": 0.5, "decoder": 1.0}  # std = scale / sqrt(fan_in)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def init_(name: str, t: torch.Tensor, gen: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        if t.ndim <= 1:
            t.fill_(1.0 if name.endswith("weight") else 0.0)  # norm scales 1; biases (and q/v biases) 0
        else:
            t.normal_(0.0, scale / t[0].numel() ** 0.5, generator=gen)


def materialise(module: torch.nn.Module, device, dtype, seed: int, scale: float) -> torch.nn.Module:
    module = module.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        init_(name, p, gen, scale)
    for name, b in module.named_buffers():
        if not name.endswith("position_ids"):
            raise ValueError(f"cannot rebuild buffer {name} after to_empty")
        b.copy_(torch.arange(b.shape[-1], device=device).expand(b.shape))
    return module.eval().requires_grad_(False)


def build_ours(variant: str, tiny: bool, device, dtype) -> tuple[Emu1Encoder | Emu2Encoder, EmuDecoder]:
    if tiny:
        p = tiny_emu2(VOCAB[variant]) if variant == "emu2" else tiny_emu1(VOCAB[variant])
    else:
        p = PRESETS["emu2-gen" if variant == "emu2" else "emu1"]
    with torch.device("meta"):
        enc = Emu2Encoder(p) if variant == "emu2" else Emu1Encoder(p)
    enc = materialise(enc, device, dtype, 0, SCALE["encoder"])
    cfgs = tiny_configs(variant, enc.embed_dim) if tiny else RELEASED[variant]
    builders = (("unet", build_unet), ("vae", build_vae), ("safety_checker", build_safety_checker))
    mods = {k: materialise(build(cfgs[k]), device, dtype, i + 1, SCALE["decoder"]) for i, (k, build) in enumerate(builders)}
    with torch.no_grad():  # thresholds above any cosine: the checker runs in full but flags nothing
        mods["safety_checker"].concept_embeds_weights.fill_(1.5)
        mods["safety_checker"].special_care_embeds_weights.fill_(1.5)
    dec = EmuDecoder(variant, mods["unet"], mods["vae"], cfgs["scheduler"], mods["safety_checker"],
                     cfgs["feature_extractor"], cfgs)
    return enc, dec


def make_tokenizer(variant: str, n: int, ref_dir: Path | None, model: Path | None = None) -> EmuTokenizer:
    """genfleet's slow path (a SentencePiece `tokenizer.model`: `model`, else the reference's; legacy
    spacing) with the references' special ids; without either, one synthetic id per word."""
    if model is None and ref_dir is not None:
        from emu_ref_adapter import tokenizer_model

        model = tokenizer_model(ref_dir, variant)
    if model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model))
        return EmuTokenizer(sp.encode, SPECIAL, n, True, "slow")
    return EmuTokenizer(lambda s: [100 + zlib.crc32(w.encode()) % 31000 for w in s.split()], SPECIAL, n, True, "slow")


def make_step(kind: str):
    if kind == "eager":
        return decode_step
    if kind == "graph":
        return GraphedStep()
    if kind == "compile":
        return torch.compile(decode_step, dynamic=False)
    raise ValueError(kind)


def ours_ar(enc, tok: EmuTokenizer, texts: list[str], step) -> tuple[torch.Tensor, torch.Tensor]:
    """B prompt rows + the "" row in one regress: (cond [B, n, d], uncond [1, n, d])."""
    rows = [tok.encode([t]) for t in texts] + [tok.encode([""])]
    x, valid = prompt_inputs(enc, rows, [None] * len(rows))
    e = regress(enc, x, valid, step=step).embeds
    return e[:-1], e[-1:]


def ours_t2i(enc, dec, tok, texts, step, *, size: int, steps: int, guidance: float, vae_chunk: int, safety: bool):
    cond, uncond = ours_ar(enc, tok, texts, step)
    gens = [torch.Generator(device=dec.device).manual_seed(1000 + i) for i in range(len(texts))]
    lat = D.denoise(dec, cond, uncond, height=size, width=size, steps=steps, guidance=guidance, generators=gens)
    pixels = torch.cat([D.decode(dec, lat[i: i + vae_chunk])[0] for i in range(0, len(texts), vae_chunk)])
    if safety:
        D.safety_check(dec, pixels)
    return pixels


def rows_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def timed(fn, device, repeats: int = 1) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_tiny(ns, pipe, variant, enc, tok) -> None:
    """Tiny, float32: the reference and genfleet, sharing weights, must give the same embeddings for the
    same ids (and genfleet's tokenizer the reference's ids)."""
    from emu_ref_adapter import encode

    from modeling.emu.tokens import Prompt

    rtok = (pipe.multimodal_encoder if variant == "emu2" else pipe.emu_encoder).decoder.tokenizer
    text = PROMPTS[0]
    ids = rtok([text + "[IMG]"]).input_ids[0]
    x, valid = prompt_inputs(enc, [Prompt(list(ids), [], 0), tok.encode([""])], [None, None])
    ours = regress(enc, x, valid).embeds
    ref = encode(pipe, variant, text)  # [cond; uncond]
    same_ids = list(ids) == tok.encode([text]).ids
    print(f"# tiny check {variant}: reference vs genfleet embeddings rel L2: cond {rel(ours[:1], ref[:1]):.1e} "
          f"(first {rel(ours[:1, :1], ref[:1, :1]):.1e}), uncond {rel(ours[1:], ref[1:]):.1e}; "
          f"genfleet tokenizer ids == reference's: {same_ids}", flush=True)


def bench_model(variant: str, args, device, dtype, ns, results: list[dict]) -> None:
    size, steps, guidance = DEFAULTS[variant][0], args.steps or DEFAULTS[variant][2], DEFAULTS[variant][3]
    if args.tiny:
        size, steps = 64, min(steps, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    enc, dec = build_ours(variant, args.tiny, device, dtype)
    n = enc.n_embeds
    ar_batches = args.ar_batch_sizes or ([2, 4] if args.tiny else [16, 64])
    t2i_batch = args.t2i_batch or (2 if args.tiny else {"emu2": 4, "emu1": 8}[variant])
    tok = make_tokenizer(variant, n, args.reference, args.tokenizer_model)
    longest = max(len(tok.encode([t]).ids) for t in PROMPTS)
    enc.setup_caches(max(ar_batches + [t2i_batch]) + 1, longest + n - 1)  # sized once for every run below
    sync(device)
    n_enc = sum(p.numel() for p in enc.parameters()) / 1e9
    n_unet = sum(p.numel() for p in dec.unet.parameters()) / 1e9
    print(f"\n## {variant}: encoder {n_enc:.2f}B values, unet {n_unet:.2f}B, {n} embeddings; {size}², {steps} steps, "
          f"guidance {guidance}; built in {time.perf_counter() - t0:.1f}s; prompts {min(len(tok.encode([t]).ids) for t in PROMPTS)}"
          f"-{longest} tokens", flush=True)
    pipe = None
    if args.reference is not None:
        from emu_ref_adapter import emu1_pipeline, emu2_pipeline

        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(99)
        build = emu2_pipeline if variant == "emu2" else emu1_pipeline
        with tempfile.TemporaryDirectory() as work:
            pipe, fresh = build(ns, enc, dec, tiny=args.tiny, workdir=Path(work), device=device, dtype=dtype,
                                init=lambda name, t: init_(name, t, gen, SCALE["encoder"]))
        sync(device)
        print(f"# reference {variant} built in {time.perf_counter() - t0:.1f}s, sharing genfleet's tensors; "
              f"drawn fresh (the reference's only): {', '.join(fresh)}", flush=True)
        if args.tiny:
            check_tiny(ns, pipe, variant, enc, tok)

    def record(stage, side, step, batch, secs, units):
        per = units / secs
        results.append(dict(model=variant, stage=stage, side=side, step=step, batch=batch, secs=secs, per=per))
        unit = "rows/s" if stage == "AR" else "images/h"
        shown = per if stage == "AR" else per * 3600
        print(f"# {variant} {stage} {side} step={step} batch={batch}: {secs:.3f} s -> {shown:,.2f} {unit}", flush=True)

    if not args.no_ar:
        if pipe is not None:
            from emu_ref_adapter import encode

            first = timed(lambda: encode(pipe, variant, PROMPTS[-1]), device)[0]  # warm-up (Emu2: fills its "" cache)
            note = ", computes and caches its '' branch" if variant == "emu2" else ""
            print(f"# {variant} AR reference first call (warm-up{note}): {first:.2f} s", flush=True)
            ts = [timed(lambda i=i: encode(pipe, variant, PROMPTS[i]), device)[0] for i in range(args.ref_rows)]
            record("AR", "reference", "-", 1, statistics.mean(ts), 1)
        for kind in args.ar_steps:
            step = make_step(kind)
            for b in ar_batches:
                texts = rows_for(b)
                ours_ar(enc, tok, texts, step)  # warm-up (graph capture / compile for this batch)
                ts = timed(lambda: ours_ar(enc, tok, texts, step), device, args.repeats)
                record("AR", "genfleet", kind, b, statistics.mean(ts), b)
    if not args.no_t2i:
        kind = args.t2i_step or args.ar_steps[-1]
        step = make_step(kind)
        kw = dict(size=size, steps=steps, guidance=guidance, vae_chunk=args.vae_chunk, safety=not args.no_safety)
        if pipe is not None:
            from emu_ref_adapter import t2i

            timed(lambda: t2i(pipe, PROMPTS[-1], size=size, steps=2, guidance=guidance), device)  # warm-up
            ts = [timed(lambda i=i: t2i(pipe, PROMPTS[i], size=size, steps=steps, guidance=guidance), device)[0]
                  for i in range(args.ref_images)]
            record("t2i", "reference", "-", 1, statistics.mean(ts), 1)
        ours = dec
        if args.compile_unet:  # genfleet's side only (the reference pipeline holds the plain module)
            ours = dataclasses.replace(dec, unet=torch.compile(dec.unet))
            kind += "+unet-compile"
        texts = rows_for(t2i_batch)
        ours_t2i(enc, ours, tok, texts, step, **{**kw, "steps": 2})  # warm-up (same shapes: graphs, compile)
        holder = {}
        ts = timed(lambda: holder.update(px=ours_t2i(enc, ours, tok, texts, step, **kw)), device)
        record("t2i", "genfleet", kind, t2i_batch, ts[0], t2i_batch)
        px = holder["px"]
        print(f"# {variant} t2i genfleet images {tuple(px.shape)} {px.dtype}, mean pixel {px.float().mean():.1f}", flush=True)
    if device.type == "cuda":
        print(f"# {variant} peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)


def table(results: list[dict]) -> None:
    print("\n| model | stage | side | step | batch | s/batch | rows/s | images/h | vs reference |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        ref = next((x for x in results if x["model"] == r["model"] and x["stage"] == r["stage"] and x["side"] == "reference"), None)
        ratio = "–" if ref is None or r is ref else f"{r['per'] / ref['per']:.1f}×"
        rows = f"{r['per']:.2f}" if r["stage"] == "AR" else "–"
        ims = f"{3600 * r['per']:,.0f}" if r["stage"] == "t2i" else "–"
        print(f"| {r['model']} | {r['stage']} | {r['side']} | {r['step']} | {r['batch']} | {r['secs']:.3f} | {rows} | {ims} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["emu2", "emu1"], default=["emu2", "emu1"])
    ap.add_argument("--reference", type=Path, default=None, help="folder with baaivision/Emu's Emu2/emu and Emu1/models")
    ap.add_argument("--ref-stubs", type=Path, default=Path("bench/emu_ref_stubs"), help="the reference's compatibility stubs")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32, on CPU (smoke test)")
    ap.add_argument("--tokenizer-model", type=Path, default=None,
                    help="LLaMA's SentencePiece tokenizer.model for genfleet's prompts (default: the reference's, else one id per word)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--ar-batch-sizes", type=int, nargs="+", default=None, help="genfleet AR rows (default 16 64)")
    ap.add_argument("--ar-steps", nargs="+", choices=["eager", "graph", "compile"], default=None,
                    help="genfleet's decode step: eager, CUDA graph, torch.compile (default: eager graph on GPU)")
    ap.add_argument("--t2i-batch", type=int, default=None, help="genfleet t2i rows (default emu2 4, emu1 8)")
    ap.add_argument("--t2i-step", choices=["eager", "graph", "compile"], default=None, help="default: last of --ar-steps")
    ap.add_argument("--compile-unet", action="store_true", help="torch.compile genfleet's unet (t2i)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the release's 50)")
    ap.add_argument("--vae-chunk", type=int, default=2, help="images per VAE decode call")
    ap.add_argument("--no-safety", action="store_true", help="genfleet side without the safety checker")
    ap.add_argument("--ref-rows", type=int, default=2, help="reference AR rows timed (batch 1 each)")
    ap.add_argument("--ref-images", type=int, default=1, help="reference t2i images timed (batch 1 each)")
    ap.add_argument("--repeats", type=int, default=2, help="timed genfleet AR batches per setting")
    ap.add_argument("--no-ar", action="store_true")
    ap.add_argument("--no-t2i", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_flush_denormal(True)  # tiny random weights on CPU: denormals would dominate the time
        torch.set_num_threads(1)  # tiny matrices: extra threads only contend
    try:
        return run(args, device, dtype)
    finally:
        if args.tiny:
            torch.set_flush_denormal(False)
            torch.set_num_threads(threads)


def run(args, device, dtype) -> int:
    args.ar_steps = args.ar_steps or (["eager", "graph"] if device.type == "cuda" else ["eager"])
    ns = None
    if args.reference is not None:
        from emu_ref_adapter import activate

        ns = activate(args.reference, args.ref_stubs)
        print(f"# reference: {ns.ref_dir} (stubs {args.ref_stubs.resolve()}; CPU fallbacks: {ns.fallbacks or 'none'})")
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {gpu}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"diffusers {diffusers.__version__}, SDPA", flush=True)
    results: list[dict] = []
    for variant in args.models:
        bench_model(variant, args, device, dtype, ns, results)
        gc.collect()  # this model's weights (both sides' modules share them) go before the next is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
