"""Where one BAGEL denoising step's GPU time goes: torch.profiler over one CFG forward.

bench_bagel.py --profile calls `profile_step` after its timings (same model, compiled or not).
The profiled forward is the second denoising forward of a short t2i run at the given size and
batch (CFG on: the conditional and CFG-text branches of every row in one packed forward),
so kernels, compiled graphs and attention self-checks are warm. Prints the top kernels by CUDA
time and each kind's share: GEMM, attention, norms/RoPE, elementwise glue, other.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# first match wins; inductor's fused kernels are named after their ops ("triton_red_fused_..._rsqrt_...")
KINDS = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "cudnn_generated", "mha")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "matmul", "cublas", "splitk", "aten::mm", "aten::addmm", "aten::bmm")),
    ("norms/RoPE", ("rsqrt", "_norm", "neg_")),
    ("elementwise glue", ("triton_", "elementwise", "copy", "index", "cat", "fill", "where", "gather", "scatter",
                          "reduce", "nonzero", "cumsum", "memcpy", "memset")),
)


MARKERS = ("Command Buffer Full",)  # CUPTI: the launch queue was full (the CPU waited), not GPU work


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def profile_step(model, rows, special, attention: str, denoise, top: int = 15) -> None:
    """Run denoise(model, rows, special, attention=...) and profile its second CFG forward."""
    orig = model.forward
    seen = {"n": 0, "prof": None, "tokens": 0, "cuda": False, "wall": None}

    def forward(h, pos, plan, gen, cache=None):
        if gen is None:
            return orig(h, pos, plan, gen, cache)
        seen["n"] += 1
        if seen["n"] == 3 and h.is_cuda:  # the next one, unprofiled, timed with events
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = orig(h, pos, plan, gen, cache)
            end.record()
            end.synchronize()
            seen["wall"] = start.elapsed_time(end)
            return out
        if seen["n"] != 2:
            return orig(h, pos, plan, gen, cache)
        cuda = h.is_cuda
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            out = orig(h, pos, plan, gen, cache)
            sync()
        seen["prof"], seen["tokens"], seen["cuda"] = prof, h.shape[0], cuda
        return out

    model.forward = forward
    try:
        denoise(model, rows, special, attention=attention)
    finally:
        del model.forward  # the class's forward again
    prof = seen["prof"]
    if prof is None:
        print("# profile: no CFG forward ran", flush=True)
        return
    per_kernel: dict[str, float] = defaultdict(float)
    if seen["cuda"]:  # kernels (and copies) as the GPU ran them; not the CPU ops that launched them, nor CUPTI markers
        for e in prof.events():
            if e.device_type == DeviceType.CUDA and not any(m in e.name for m in MARKERS):
                per_kernel[e.name] += e.time_range.elapsed_us() / 1e3
    else:  # CPU smoke runs: the ops' own CPU time
        for e in prof.key_averages():
            if e.self_cpu_time_total:
                per_kernel[e.key] += e.self_cpu_time_total / 1e3
    total = sum(per_kernel.values())
    shares: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        shares[kind(name)] += ms
    wall = f"; the next forward, unprofiled: {seen['wall']:.1f} ms wall (CUDA events)" if seen["wall"] else ""
    print(f"\n# profile of one denoising forward ({len(rows)} rows, {seen['tokens']} packed tokens, {attention}): "
          f"{total:.1f} ms of {'CUDA kernel' if seen['cuda'] else 'CPU op'} time{wall}")
    print("# by kind: " + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                                    for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    print("| ms | share | kind | kernel |")
    print("|---:|---:|---|---|")
    for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {ms:.2f} | {100 * ms / total:.1f}% | {kind(name)} | `{name[:120]}` |")
    print(flush=True)
