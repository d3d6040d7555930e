"""A random-weight BAGEL checkpoint directory in the released BAGEL-7B-MoT layout.

    python bench/bagel_checkpoint.py DIR                 # 7B (14.6B params, bf16 ~29 GB) built on the GPU
    python bench/bagel_checkpoint.py DIR --tiny          # the tiny shapes, float32, on CPU

Writes what modeling/bagel/load.py and pipeline/families/bagel.py read: `ema.safetensors`
(bf16, the released names and shapes: ../shared/fixtures/bagel-7b-mot.shapes.json),
`ae.safetensors` (float32, as FLUX's), `llm_config.json`, `vit_config.json` (the loader's
conventions: the ViT config lists one layer more) and Qwen2 tokenizer files (the tiny kit's
byte-level BPE from modeling/bagel/tiny.py, with the BAGEL special tokens). The modules are
built on the meta device, materialised on `--device` and initialised as bench/bench_bagel.py
does (so both time the same weights' kind); each tensor is streamed to the file, so the host
holds one tensor at a time. The files are fsync'ed and dropped from the page cache
(posix_fadvise DONTNEED), so the next load reads the disk. Prints one JSON line of timings.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bagel import build  # noqa: E402  (bench/, beside this file)

from modeling.bagel.load import bagel_params, read_shapes  # noqa: E402
from modeling.bagel.tiny import _llm_config, _vit_config, write_tokenizer  # noqa: E402

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """A safetensors file written one tensor at a time (device -> host -> file); returns its bytes."""
    items = list(tensors)
    header: dict[str, dict] = {}
    off = 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}  # type: ignore[assignment]
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, t in items:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().data)
        f.flush()
        os.fsync(f.fileno())
    drop_cache(path)
    return 8 + len(head) + off


def drop_cache(path: Path) -> None:
    """Evict the file's pages from this machine's page cache (only that file's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_checkpoint(out: Path, tiny: bool, device: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dtype = torch.float32 if tiny else torch.bfloat16
    model, ae = build(tiny, device, dtype, torch.float32)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    vocab = write_tokenizer(out)  # tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
    if vocab > model.params.vocab_size:
        raise ValueError(f"tokenizer has {vocab} ids, the model's embedding {model.params.vocab_size}")
    (out / "llm_config.json").write_text(json.dumps(_llm_config(model.params), indent=1))
    (out / "vit_config.json").write_text(json.dumps(_vit_config(model.params.vit), indent=1))
    t1 = time.perf_counter()
    ema = write_safetensors(out / "ema.safetensors", model.state_dict().items())
    t2 = time.perf_counter()
    ae_bytes = write_safetensors(out / "ae.safetensors", ae.state_dict().items())
    t3 = time.perf_counter()
    if bagel_params(out) != model.params:  # what the loader reads back: the same shapes
        raise ValueError(f"{out}: the loader reads {bagel_params(out)}, built {model.params}")
    if read_shapes(out / "ema.safetensors") != {k: tuple(v.shape) for k, v in model.state_dict().items()}:
        raise ValueError(f"{out / 'ema.safetensors'}: names or shapes differ from the model's")
    return {"dir": str(out), "ema_bytes": ema, "ae_bytes": ae_bytes, "params": sum(t.numel() for t in model.parameters()),
            "build_s": round(t1 - t0, 2), "write_ema_s": round(t2 - t1, 2), "write_ae_s": round(t3 - t2, 2),
            "ema_write_gb_s": round(ema / 1e9 / max(t2 - t1, 1e-9), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32, on CPU")
    ap.add_argument("--device", default=None, help="where the weights are made (default: cuda, cpu with --tiny)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    print(json.dumps(write_checkpoint(args.dir, args.tiny, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
