"""DALLE2-pytorch 1.15.6's own sampler for the upsampler alone: Decoder.sample from unet 2 (64² -> 256²).

Runs in the reference's environment (the carried wheels and shared/tools/dalle2-ref/stubs on
PYTHONPATH); bench_dalle2.py --reference --upsampler starts it in a subprocess:
    PYTHONPATH=SITE:STUBS python bench/dalle2_ref_upsampler.py --batch-sizes 1,16 --steps 64
    PYTHONPATH=SITE:STUBS python bench/dalle2_ref_upsampler.py --tiny      # CPU smoke test
The upsampler's shapes come from bench/dalle2_upsampler.py (data only; genfleet's bench builds the
same ones). Random weights, DDIM, cond_scale 1, low-res noise augmentation at 0.2, the sampler's
defaults otherwise (one_unet_in_gpu_at_time). Each batch size: a 4-step warm-up, then timed runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dalle2_upsampler import STAND_IN_UNET1, TINY_UNET1, decoder_section, load_upsampler  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16"], help="fp16: under fp16 autocast")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--upsampler-config", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    from dalle2_pytorch.train_configs import DecoderConfig

    dev = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    steps = min(args.steps, 4) if args.tiny else args.steps
    sizes, dim = ((16, 32), 64) if args.tiny else ((64, 256), 768)
    section = decoder_section(TINY_UNET1 if args.tiny else STAND_IN_UNET1, load_upsampler(args.upsampler_config, args.tiny),
                              sizes)
    dec = DecoderConfig(**section).create().to(dev).eval()
    n = sum(p.numel() for p in dec.unets[1].parameters()) / 1e6
    print(f"REF upsampler unet 2: {n:.1f}M params, {sizes[0]}² -> {sizes[1]}², DDIM {steps}, {args.precision}", flush=True)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for b in (int(x) for x in args.batch_sizes.split(",")):
        g = torch.Generator().manual_seed(b)
        emb = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1).to(dev)
        low = torch.rand(b, 3, sizes[0], sizes[0], generator=g).to(dev)
        fp16 = args.precision == "fp16"
        ctx = torch.autocast(dev, dtype=torch.float16 if dev == "cuda" else torch.bfloat16, enabled=fp16)

        def run():
            out = dec.sample(image=low, image_embed=emb, start_at_unet_number=2, cond_scale=1.0)
            assert out.shape == (b, 3, sizes[1], sizes[1]), out.shape

        with torch.no_grad(), ctx:
            dec.sample_timesteps = (steps, min(4, steps))
            run()  # warm-up
            dec.sample_timesteps = (steps, steps)
            times = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                times.append(time.perf_counter() - t0)
        dt = sum(times) / len(times)
        label = ("fp16-autocast" if dev == "cuda" else "bf16-autocast") if fp16 else "fp32"
        print(f"REF upsampler {sizes[1]}px DDIM{steps} B={b} {label}: {dt:.2f} s, {b / dt * 3600:.0f} images/h", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
