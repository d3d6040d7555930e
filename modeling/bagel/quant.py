"""Weight quantisation of the BAGEL LLM's decoder layers: NF4 / INT8 through bitsandbytes
(CUDA only), or FP8 (e4m3) GEMMs through torch's scaled matmul (`torch._scaled_mm`, row-wise scales).

Every Linear of the LLM's decoder layers (both experts: attention projections and MLPs) is
replaced; embeddings, lm_head, the ViT, the connector and the latent bridges keep the load
dtype. The model may be loaded on the CPU first, so the GPU never holds the 16-bit weights.
All three are approximations of the checkpoint and never the default; BENCHMARKS.md records
FP8's speed and its drift from the exact path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MODES = ("nf4", "int8", "fp8")
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer have FP8 tensor cores


class Fp8Linear(nn.Module):
    """x W^T + b with W stored as float8 e4m3 and one float32 scale per output channel.

    Each call scales x per token to e4m3 (dynamic row-wise scales, amax / 448) and runs one
    scaled GEMM that accumulates in float32 and writes bfloat16. Per-token and per-channel
    scales keep the one outlier token or channel from costing everyone else their precision,
    which a single tensor-wide scale would. Why not torchao: one small module over
    `torch._scaled_mm` does what is needed here, without another dependency that pins torch.
    (`torch._scaled_mm` is private but has kept its form since torch 2.5; the public
    `F.scaled_mm` is newer than the torch some GPU images carry.)"""

    def __init__(self, lin: nn.Linear, device: torch.device | str):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.data.to(device, torch.float32)
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        self.register_buffer("weight", (w / scale).to(torch.float8_e4m3fn))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.data.to(device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        scale = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)  # [M, 1]; max is exact in x's dtype
        xq = (x2 / scale).to(torch.float8_e4m3fn)
        # weight.t() is the column-major [in, out] operand the FP8 GEMM wants; the bias is added
        # after it, in x's dtype, the same on every backend
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def check_quantize(mode: str | None, device: str) -> None:
    """Raise ValueError unless `mode` is None or can run here: nf4 / int8 need bitsandbytes on
    CUDA; fp8 needs FP8 tensor cores on CUDA (compute capability 8.9+) and runs on the CPU too
    (slowly: for tests and checks)."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}")
    cuda = str(device).startswith("cuda")
    if mode == "fp8":
        if cuda and torch.cuda.get_device_capability(device) < FP8_CAPABILITY:
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            raise ValueError(f"quantize=fp8 needs FP8 tensor cores (compute capability 8.9+); {device!r} has {cap}")
        return
    if not cuda:
        raise ValueError(f"quantize={mode} needs a CUDA device (bitsandbytes); this stage runs on {device!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(f"quantize={mode} needs bitsandbytes, which does not import here ({e})") from None


def _convert_bnb(lin: nn.Linear, mode: str, device: str) -> nn.Module:
    import bitsandbytes as bnb

    w = lin.weight.data
    if mode == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=w.dtype,
                              compress_statistics=False, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to(device)
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.to(device), requires_grad=False)
    return q


def quantize_llm(model: nn.Module, mode: str, device: str) -> nn.Module:
    """Quantise a Bagel's decoder-layer Linears onto `device` (the model may be on the CPU or
    already there); move the rest there."""
    check_quantize(mode, device)
    for layer in model.language_model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    new = Fp8Linear(child, device) if mode == "fp8" else _convert_bnb(child, mode, device)
                    setattr(parent, name, new)
    return model.to(device).eval().requires_grad_(False)
