"""DALLE2 throughput: LAION-size prior + decoder v1.0.2 (unet 1, 64²) with random weights.

    python bench/bench_dalle2.py                      # GPU, bf16, SDPA, channels-last
    python bench/bench_dalle2.py --compile            # + torch.compile of the prior net and unet
    python bench/bench_dalle2.py --tiny               # tiny models on CPU (smoke test)
    python bench/bench_dalle2.py --compile reduce-overhead --batch-sizes 1,64 --upsampler --reference --ref-site SITE
                                                      # + the upsampler; then DALLE2-pytorch's own samplers, same GPU

Per batch size: one warm-up batch, then timed batches of prior (DDIM, reranking 2 candidates)
followed by decoder unet 1 (DDIM, classifier-free guidance batched into one forward). Prints a
markdown table of seconds per batch and images/hour. CLIP text encoding (~13 GFLOP per prompt,
negligible) is not included: random text embeddings/encodings stand in for it.

--upsampler: also unet 2 (64² -> 256², DDIM, cond_scale 1, low-res noise 0.2) at
--upsampler-batch-sizes (shapes: bench/dalle2_upsampler.py, a stand-in unless --upsampler-config).
--noise-copy both: each batch size also with the per-step noise copied the old way (a plain copy,
which syncs the stream) and the outputs of the two compared. --reference: afterwards, in
subprocesses on the same GPU, DALLE2-pytorch 1.15.6's own samplers (shared/tools/dalle2-ref's
bench.py, bench/dalle2_ref_upsampler.py) from the wheels installed at --ref-site, and the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dalle2_ref  # noqa: E402  (bench/, beside this file)
from dalle2_upsampler import STAND_IN_UNET1, TINY_UNET1, decoder_section, load_upsampler  # noqa: E402

from modeling.dalle2.convert import decoder_params, prior_params  # noqa: E402
from modeling.dalle2.decoder import Decoder  # noqa: E402
from modeling.dalle2.presets import LAION_DECODER_V102, LAION_PRIOR  # noqa: E402
from modeling.dalle2.prior import DiffusionPriorNetwork  # noqa: E402
from modeling.dalle2.sampling import per_sample_noise, sample_prior, sample_unet  # noqa: E402
from modeling.dalle2.tiny import DECODER as TINY_DECODER  # noqa: E402
from modeling.dalle2.tiny import PRIOR as TINY_PRIOR

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(args, device, dtype):
    prior_cfg, dec_cfg = (TINY_PRIOR, TINY_DECODER) if args.tiny else (LAION_PRIOR, LAION_DECODER_V102)
    pp = prior_params(prior_cfg)
    # the LAION release: Conv2d downsampling and dalle2-pytorch ~1.1 attention numerics
    dp = decoder_params(dec_cfg, None if args.tiny else ["conv"], (False, False) if args.tiny else (True, True))
    pp.legacy_attention = not args.tiny
    with torch.device(device):
        torch.manual_seed(0)
        prior = DiffusionPriorNetwork(pp)
        decoder = Decoder(dp, [1])
    for m in (prior, decoder):
        with torch.no_grad():
            for name, p in m.named_parameters():  # zero-initialised null embeddings: make them random too
                if name.startswith(("null", "learned_query")) or "null_" in name:
                    p.normal_(0, 0.02)
        m.to(dtype).eval().requires_grad_(False)
    unet = decoder.unets[0]
    if not args.no_channels_last and device != "cpu":
        unet.to(memory_format=torch.channels_last)
    return prior, decoder, unet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--steps", type=int, default=64, help="decoder DDIM steps")
    ap.add_argument("--prior-steps", type=int, default=64, help="prior DDIM steps")
    ap.add_argument("--guidance", type=float, default=1.7, help="decoder cond_scale")
    ap.add_argument("--prior-guidance", type=float, default=1.0, help="prior cond_scale (LAION prior: 1)")
    ap.add_argument("--rerank", type=int, default=2, help="prior candidates per prompt")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per batch size")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    help="torch.compile the prior net and unet; optional mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny models, float32 on CPU, few steps")
    ap.add_argument("--noise-copy", choices=["async", "sync", "both"], default="async",
                    help="per-step noise to the GPU: pinned, no sync (async, the default) / a plain copy / both, compared")
    ap.add_argument("--upsampler", action="store_true", help="also time unet 2 (64² -> 256²)")
    ap.add_argument("--upsampler-batch-sizes", default="1,16")
    ap.add_argument("--upsampler-config", default=None, help="JSON: the upsampler's unet section (or a decoder config)")
    ap.add_argument("--reference", action="store_true", help="then time DALLE2-pytorch's own samplers (subprocesses)")
    ap.add_argument("--ref-site", default=None, help="where the reference's wheels are installed (PYTHONPATH)")
    ap.add_argument("--ref-tools", default=None, help="shared/tools/dalle2-ref as copied (default .dalle2-tools/)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        args.dtype, args.steps, args.prior_steps, args.repeats = "fp32", min(args.steps, 4), min(args.prior_steps, 4), 1
        if args.batch_sizes == "1,16,64":
            args.batch_sizes = "1,2"
        torch.set_flush_denormal(True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tools = dalle2_ref.find_tools(args.ref_tools) if args.reference else None
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    prior, decoder, unet = build(args, device, dtype)
    if args.compile:
        prior.forward = torch.compile(prior.forward, mode=args.compile)
        unet.forward = torch.compile(unet.forward, mode=args.compile)
    p = decoder.params
    n_prior = sum(x.numel() for x in prior.parameters()) / 1e6
    n_unet = sum(x.numel() for x in unet.parameters()) / 1e6
    text_len, dim = (77, prior.params.dim)
    text_dim = p.unets[0].text_embed_dim or dim
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one_batch(b: int, seed: int, pinned: bool = True) -> tuple[float, float, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        te = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).to(device)
        enc = torch.randn(b, text_len, text_dim, generator=g)
        for i in range(b):
            enc[i, 8 + (i * 7) % (text_len - 8):] = 0
        enc = enc.to(device)
        noise = per_sample_noise([torch.Generator().manual_seed(seed * 1000 + i) for i in range(b)], device, pinned=pinned)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            emb = sample_prior(prior, te, enc if text_dim == dim else None, noise, steps=args.prior_steps,
                               cond_scale=args.prior_guidance, eta=1.0, num_samples_per_batch=args.rerank)
            sync()
            t1 = time.perf_counter()
            img = sample_unet(unet, p, 1, emb, enc, noise, steps=args.steps, cond_scale=args.guidance, eta=0.0)
        sync()
        t2 = time.perf_counter()
        assert img.shape[0] == b
        return t1 - t0, t2 - t1, img

    size = p.image_sizes[0]
    print(f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}) dtype={args.dtype} "
          f"compile={args.compile} channels_last={not args.no_channels_last and device != 'cpu'}")
    print(f"prior {n_prior:.1f}M params, {args.prior_steps} DDIM steps, rerank {args.rerank}, cond_scale "
          f"{args.prior_guidance}; decoder unet 1 {n_unet:.1f}M params, {size}², {args.steps} DDIM steps, "
          f"cond_scale {args.guidance}\n")
    print("| batch | noise copy | prior s/batch | decoder s/batch | total s/batch | images/hour | peak GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    variants = {"async": [True], "sync": [False], "both": [True, False]}[args.noise_copy]
    ours: dict[int, tuple[float, float]] = {}
    batches = [int(x) for x in args.batch_sizes.split(",")]
    for b in batches:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        one_batch(b, 0)  # warm-up (and compilation)
        imgs = []
        for pinned in variants:
            times = [one_batch(b, r + 1, pinned) for r in range(args.repeats)]
            tp = sum(t[0] for t in times) / len(times)
            td = sum(t[1] for t in times) / len(times)
            imgs.append(times[0][2])
            ours.setdefault(b, (tp, td))
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
            print(f"| {b} | {'async' if pinned else 'sync'} | {tp:.3f} | {td:.3f} | {tp + td:.3f} | "
                  f"{3600 * b / (tp + td):,.0f} | {peak:.1f} |", flush=True)
        if len(imgs) == 2:
            print(f"# batch {b}: async vs sync noise copy, same seeds: max |diff| {(imgs[0] - imgs[1]).abs().max():.3g}",
                  flush=True)
    up = time_upsampler(args, device, dtype) if args.upsampler else {}
    if args.reference:
        label = f"compile {args.compile}" if args.compile else "eager"
        ref = dalle2_ref.run_prior_decoder(tools, args.ref_site, batches, args.steps, args.tiny)
        dalle2_ref.print_prior_decoder(ours, ref, label)
        if args.upsampler:
            ref_up = dalle2_ref.run_upsampler(tools, args.ref_site, list(up), args.steps, args.tiny, args.upsampler_config)
            dalle2_ref.print_upsampler(up, ref_up, label)
    return 0


def time_upsampler(args, device, dtype) -> dict[int, float]:
    """unet 2 alone (64² -> 256²): s per batch at each --upsampler-batch-sizes."""
    sizes, dim = ((16, 32), 64) if args.tiny else ((64, 256), 768)
    section = decoder_section(TINY_UNET1 if args.tiny else STAND_IN_UNET1, load_upsampler(args.upsampler_config, args.tiny),
                              sizes)
    p = decoder_params(section)
    with torch.device(device):
        torch.manual_seed(1)
        unet = Decoder(p, [2]).unets[1]
    unet.to(dtype).eval().requires_grad_(False)
    if not args.no_channels_last and device != "cpu":
        unet.to(memory_format=torch.channels_last)
    if args.compile:
        unet.forward = torch.compile(unet.forward, mode=args.compile)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = sum(x.numel() for x in unet.parameters()) / 1e6
    print(f"\nupsampler unet 2: {n:.1f}M params, {sizes[0]}² -> {sizes[1]}², {args.steps} DDIM steps, cond_scale 1, "
          f"low-res noise {p.lowres_noise_sample_level}")
    print("| batch | upsampler s/batch | images/hour | peak GiB |")
    print("|---:|---:|---:|---:|")
    out = {}
    for b in (int(x) for x in args.upsampler_batch_sizes.split(",")):
        g = torch.Generator().manual_seed(b)
        emb = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).to(device)
        low = torch.rand(b, 3, sizes[0], sizes[0], generator=g).to(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for r in range(args.repeats + 1):  # the first: warm-up (and compilation)
            noise = per_sample_noise([torch.Generator().manual_seed(r * 1000 + i) for i in range(b)], device)
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                img = sample_unet(unet, p, 2, emb, None, noise, prev_image=low, steps=args.steps, cond_scale=1.0, eta=0.0)
            sync()
            times.append(time.perf_counter() - t0)
            assert img.shape == (b, 3, sizes[1], sizes[1])
        out[b] = sum(times[1:]) / len(times[1:])
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
        print(f"| {b} | {out[b]:.3f} | {3600 * b / out[b]:,.0f} | {peak:.1f} |", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
