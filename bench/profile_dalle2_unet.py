"""Where the LAION decoder unet's time goes: one guided DDIM step at a batch size, by CUDA kernel.

    python bench/profile_dalle2_unet.py --batch 64 --compile

Builds the same random-weight unet as bench_dalle2.py and profiles a few forwards of the
guided batch (cond + uncond = 2 x batch) with torch.profiler; prints the kernels that take the
most GPU time and the share of each kind (convolution, GEMM, attention, normalisation, other).

    python bench/profile_dalle2_unet.py --batch 64 --count

--count needs no GPU: one forward on the meta device prints its FLOPs by op
(torch.utils.flop_counter) and the bytes the GroupNorms write, with the floor those give at
given matrix and memory rates (--tflops, --tbps: what these machines measure).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dalle2 import build  # noqa: E402

# first match wins: Triton kernels are inductor's fusions (their names list the fused ops, often
# "convolution" for a conv's epilogue); cuDNN's SDPA kernel is named "...fprop..." like a conv
KINDS = (("fused (triton)", ("triton_",)), ("attention", ("sdpa", "flash", "fmha", "attention")),
         ("conv", ("fprop", "implicit_gemm", "conv")), ("gemm", ("nvjet", "gemm", "cutlass", "matmul")))


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def count(unet, step, images: int, args) -> None:
    """FLOPs by op and GroupNorm output bytes of one forward (`step`, on the meta device); the floor they give."""
    from torch.utils.flop_counter import FlopCounterMode

    written = []
    hooks = [m.register_forward_hook(lambda m, i, out: written.append(out.numel() * out.element_size()))
             for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        step()
    for h in hooks:
        h.remove()
    flops = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    conv, total = flops.get("aten.convolution", 0), fc.get_total_flops()
    gn = sum(written)
    print(f"one forward of {images}: {total / 1e12:.2f} TFLOP, " + ", ".join(
        f"{k} {v / 1e12:.2f}" for k, v in sorted(flops.items(), key=lambda kv: -kv[1])))
    # a GroupNorm (+ scale/shift + SiLU, fused) reads its input twice (statistics, then normalise) and writes once
    print(f"{len(written)} GroupNorms write {gn / 1e9:.2f} GB; read twice and written once: {3 * gn / 1e9:.2f} GB")
    t_conv, t_gn, t_rest = conv / args.tflops / 1e9, 3 * gn / args.tbps / 1e9, (total - conv) / args.tflops / 1e9
    print(f"floor at {args.tflops:.0f} TFLOP/s and {args.tbps:.1f} TB/s: convolutions {t_conv:.1f} ms + GroupNorms "
          f"{t_gn:.1f} ms + other matmuls {t_rest:.1f} ms = {t_conv + t_gn + t_rest:.1f} ms per forward")


class ChannelStatsGroupNorm(torch.nn.GroupNorm):
    """GroupNorm from per-channel sums of x and x² (one reduction over H x W, which reads a
    channels-last tensor along its contiguous channels), then one pass that normalises."""

    def forward(self, x):
        n, c, g = x.shape[0], x.shape[1], self.num_groups
        xf = x.float()
        m1 = xf.mean(dim=(2, 3)).view(n, g, -1).mean(-1)
        m2 = xf.square().mean(dim=(2, 3)).view(n, g, -1).mean(-1)
        rstd = (m2 - m1.square()).clamp_min(0).add(self.eps).rsqrt()
        scale = self.weight.float().view(g, -1) * rstd[..., None]
        shift = self.bias.float().view(g, -1) - m1[..., None] * scale
        return (xf * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)).to(x.dtype)


def gn_ab(unet, step, compile_mode: str | None, iters: int = 20) -> None:
    """Forward time with torch's GroupNorm, then with ChannelStatsGroupNorm, same inputs and weights."""
    def timed():
        f = torch.compile(step, mode=compile_mode) if compile_mode else step
        with torch.no_grad():
            for _ in range(3):
                out = f()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                f()
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / iters, out.float()

    ms0, y0 = timed()
    print(f"GroupNorm (torch): {ms0:.2f} ms per forward", flush=True)
    for m in unet.modules():
        if type(m) is torch.nn.GroupNorm:
            m.__class__ = ChannelStatsGroupNorm
    torch._dynamo.reset()
    ms1, y1 = timed()
    rel = float((y1 - y0).norm() / y0.norm())
    print(f"GroupNorm (per-channel statistics): {ms1:.2f} ms per forward; output rel L2 vs torch's {rel:.2e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compile", nargs="?", const="default", default=None)
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--steps", type=int, default=5, help="profiled forwards")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gn-ab", action="store_true", help="time torch's GroupNorm against per-channel statistics instead")
    ap.add_argument("--count", action="store_true", help="FLOPs and GroupNorm bytes on the meta device, and their floor")
    ap.add_argument("--tflops", type=float, default=788.0, help="--count: the bf16 matrix rate (a plain 8192³ product)")
    ap.add_argument("--tbps", type=float, default=4.3, help="--count: memory bandwidth, bytes read + written")
    args = ap.parse_args(argv)
    if args.count:  # the released shapes on the meta device: nothing is computed, only counted
        args.tiny, args.no_channels_last = False, True
        dev, dtype = "meta", torch.bfloat16
    else:
        args.tiny = not torch.cuda.is_available()  # a CPU smoke run of the script itself
        dev, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    torch.backends.cudnn.benchmark = True
    _, decoder, unet = build(args, dev, dtype)
    if args.compile and not (args.gn_ab or args.count):
        unet.forward = torch.compile(unet.forward, mode=args.compile)
    p = decoder.params.unets[0]
    b = 2 * args.batch  # guidance: cond and uncond in one forward
    size = decoder.params.image_sizes[0]
    x = torch.randn(b, 3, size, size, device=dev, dtype=dtype)
    t = torch.randint(0, 1000, (b,), device=dev)
    img_emb = torch.randn(b, p.image_embed_dim, device=dev, dtype=dtype)
    enc = torch.randn(b, 77, p.text_embed_dim, device=dev, dtype=dtype)
    drop = torch.arange(b, device=dev) >= args.batch  # the second half is the null branch

    def step():
        return unet(x, t, image_embed=img_emb, text_encodings=enc, drop=drop)

    if args.count:
        count(unet, step, b, args)
        return 0
    if args.gn_ab:
        gn_ab(unet, step, args.compile)
        return 0
    with torch.no_grad():
        for _ in range(3):
            step()
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CUDA if dev == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
            sync()
    per_kernel = defaultdict(float)
    for e in prof.key_averages():
        spent = e.self_device_time_total if dev == "cuda" else e.self_cpu_time_total
        if spent:
            per_kernel[e.key] += spent / args.steps / 1e3
    total = sum(per_kernel.values())
    shares = defaultdict(float)
    for name, ms in per_kernel.items():
        shares[kind(name)] += ms
    print(f"batch {args.batch} (forward of {b}), compile={args.compile}: {total:.1f} ms GPU per forward")
    print("by kind: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{ms:8.2f} ms  {100 * ms / total:5.1f}%  {kind(name):9s} {name[:140]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
