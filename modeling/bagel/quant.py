"""Weight-only NF4 / INT8 quantisation of the BAGEL LLM through bitsandbytes (CUDA only).

Every Linear of the LLM's decoder layers (both experts) is replaced by a bitsandbytes
layer; embeddings, lm_head, the ViT, the connector and the latent bridges keep the load
dtype. The model is loaded on the CPU first, so the GPU never holds the 16-bit weights.
"""

from __future__ import annotations

from torch import nn

MODES = ("nf4", "int8")


def check_quantize(mode: str | None, device: str) -> None:
    """Raise ValueError unless `mode` is None or can run here (bitsandbytes on CUDA)."""
    if mode is None:
        return
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if not str(device).startswith("cuda"):
        raise ValueError(f"quantize={mode} needs a CUDA device (bitsandbytes); this stage runs on {device!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(f"quantize={mode} needs bitsandbytes, which does not import here ({e})") from None


def _convert(bnb, lin: nn.Linear, mode: str, device: str) -> nn.Module:
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
    """Quantise a CPU-loaded Bagel's decoder-layer Linears onto `device`; move the rest there."""
    check_quantize(mode, device)
    import bitsandbytes as bnb

    for layer in model.language_model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, _convert(bnb, child, mode, device))
    return model.to(device).eval().requires_grad_(False)
