"""A random-weight Emu2-Gen model folder in the released BAAI/Emu2-Gen layout.

    python bench/emu_checkpoint.py DIR                       # released sizes (39B values, bf16 ~80 GB), built on the GPU
    python bench/emu_checkpoint.py DIR --tiny                # the tiny shapes, float32, on CPU
    python bench/emu_checkpoint.py DIR --tokenizer-model M   # LLaMA's tokenizer.model (the release's 32,000 pieces)
    python bench/emu_checkpoint.py DIR --spill RAMDIR        # encoder shards that no longer fit DIR's disk go to RAMDIR

Writes what modeling/emu/load.py and modeling/emu/decoder.py read: model_index.json;
multimodal_encoder/ (config.json, `model.bf16-*` shards of about --shard-gb each in the
release's tensor names, fused EVA qkv biases, lm_head, inv_freq, both index files);
tokenizer/ (the release's added tokens after the SentencePiece model's pieces); unet/, vae/,
safety_checker/ (bf16 `.bf16.safetensors`, as released), scheduler/, feature_extractor/.
Weights are drawn as bench/bench_emu.py draws them (`build_ours`), so both time the same
weights' kind. Each tensor is streamed to its file (bench/bagel_checkpoint.py's writer: the
host holds one tensor at a time), fsync'ed and dropped from the page cache, so the next load
reads the disk.

Why --spill: the released encoder alone is 74 GB, more than some machines' disk. A shard that
would leave the disk with less than --keep-free GiB is written to RAMDIR (a tmpfs) instead, and
linked from multimodal_encoder/; the JSON line printed at the end says how many bytes went
where, so a load time can be read against the storage it came from. The folder is then
checked with the loader's own check_layout. Prints one JSON line of timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bagel_checkpoint import write_safetensors  # noqa: E402  (bench/, beside this file)
from bench_emu import build_ours  # noqa: E402

from modeling.emu.decoder import CONFIGS, WEIGHTS, release_names  # noqa: E402
from modeling.emu.layout import release_state_dict, unused_tensors  # noqa: E402
from modeling.emu.llama import inv_freq  # noqa: E402
from modeling.emu.load import check_layout, encoder_params  # noqa: E402
from modeling.emu.tiny import EMU2_MODEL_INDEX, emu2_config  # noqa: E402
from modeling.emu.tiny_tokenizer import write_emu2_tokenizer  # noqa: E402

INDEXES = ("model.safetensors.index.json", "model.safetensors.index.bf16.json")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encoder_tensors(enc, device, dtype) -> list[tuple[str, torch.Tensor]]:
    """The released names in the release's order (EVA, then the adapters, then the LLM), with the
    tensors the loader accepts unused: lm_head (drawn), inv_freq (float32, from rope_theta)."""
    p = enc.params
    out = dict(release_state_dict(enc))
    gen = torch.Generator(device=device).manual_seed(7)
    for name, shape in unused_tensors(p).items():
        if name.endswith("inv_freq"):
            out[name] = inv_freq(p.llm.head_dim, p.llm.rope_theta)
        else:
            out[name] = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    order = lambda k: (k.startswith("model.decoder."), k)  # noqa: E731
    return [(k, out[k]) for k in sorted(out, key=order)]


def shards(items: list[tuple[str, torch.Tensor]], limit: int) -> list[list[tuple[str, torch.Tensor]]]:
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for k, t in items:
        if groups[-1] and size + nbytes(t) > limit:
            groups.append([])
            size = 0
        groups[-1].append((k, t))
        size += nbytes(t)
    return groups


def write_checkpoint(out: Path, tiny: bool, device: str, tokenizer_model: Path | None, spill: Path | None,
                     shard_gb: float, keep_free_gb: float) -> dict:
    t0 = time.perf_counter()
    dtype = torch.float32 if tiny else torch.bfloat16
    enc, dec = build_ours("emu2", tiny, torch.device(device), dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    vocab = write_emu2_tokenizer(out / "tokenizer", tokenizer_model.read_bytes() if tokenizer_model else None)
    if vocab > enc.params.llm.vocab_size:
        raise ValueError(f"tokenizer has {vocab} ids, the model's embedding {enc.params.llm.vocab_size}")
    (out / "model_index.json").write_text(json.dumps(EMU2_MODEL_INDEX, indent=2))
    for kind in CONFIGS:
        (out / CONFIGS[kind]).parent.mkdir(parents=True, exist_ok=True)
        (out / CONFIGS[kind]).write_text(json.dumps(dec.configs[kind], indent=2))
    decoder_bytes = 0
    where = {"disk": 0, "spill": 0}  # the encoder's bytes on each
    for kind in ("unet", "vae", "safety_checker"):  # the decoder first: small, always on the disk
        name = WEIGHTS["emu2"]["safety_checker" if kind == "safety_checker" else "model"][0]
        sd = release_names(kind, getattr(dec, kind).state_dict())
        decoder_bytes += write_safetensors(out / kind / name, sd.items())
    t2 = time.perf_counter()
    enc_dir = out / "multimodal_encoder"
    enc_dir.mkdir(parents=True, exist_ok=True)
    (enc_dir / "config.json").write_text(json.dumps(emu2_config(enc.params, "float32" if tiny else "bfloat16"), indent=2))
    items = encoder_tensors(enc, torch.device(device), dtype)
    groups = shards(items, int(shard_gb * 1e9))
    weight_map: dict[str, str] = {}
    spilled: list[str] = []
    for i, group in enumerate(groups, 1):
        name = f"model.bf16-{i:05d}-of-{len(groups):05d}.safetensors"
        size = sum(nbytes(t) for _, t in group)
        room = shutil.disk_usage(enc_dir).free - keep_free_gb * 2**30
        if spill is not None and size > room:
            spill.mkdir(parents=True, exist_ok=True)
            where["spill"] += write_safetensors(spill / name, group)
            (enc_dir / name).symlink_to(spill / name)
            spilled.append(name)
        else:
            where["disk"] += write_safetensors(enc_dir / name, group)
        weight_map.update({k: name for k, _ in group})
    index = {"metadata": {"total_size": sum(nbytes(t) for _, t in items)},
             "weight_map": dict(sorted(weight_map.items()))}
    for name in INDEXES:
        (enc_dir / name).write_text(json.dumps(index, indent=2))
    t3 = time.perf_counter()
    check_layout(out, safety_checker=True)  # what the family's check reads: names, shapes, configs, tokenizer
    if encoder_params(out) != enc.params:
        raise ValueError(f"{out}: the loader reads {encoder_params(out)}, built {enc.params}")
    written = decoder_bytes + where["disk"] + where["spill"]
    return {"dir": str(out), "bytes": written, "decoder_bytes": decoder_bytes, "encoder_disk_bytes": where["disk"],
            "encoder_spill_bytes": where["spill"],
            "spilled_shards": spilled, "shards": len(groups), "tokenizer_ids": vocab,
            "params": sum(t.numel() for t in enc.parameters()) + sum(t.numel() for t in dec.unet.parameters()),
            "build_s": round(t1 - t0, 2), "write_decoder_s": round(t2 - t1, 2), "write_encoder_s": round(t3 - t2, 2),
            "write_gb_s": round(written / 1e9 / max(t3 - t1, 1e-9), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32, on CPU")
    ap.add_argument("--device", default=None, help="where the weights are made (default: cuda, cpu with --tiny)")
    ap.add_argument("--tokenizer-model", type=Path, default=None, help="a SentencePiece tokenizer.model (default: a tiny trained one)")
    ap.add_argument("--spill", type=Path, default=None, help="a RAM folder for encoder shards that do not fit the disk")
    ap.add_argument("--shard-gb", type=float, default=None, help="encoder shard size (default 5; tiny 0.01: several shards too)")
    ap.add_argument("--keep-free", type=float, default=2.0, help="GiB the disk keeps free")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shard_gb = args.shard_gb or (0.01 if args.tiny else 5.0)
    print(json.dumps(write_checkpoint(args.dir, args.tiny, device, args.tokenizer_model, args.spill, shard_gb,
                                      args.keep_free)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    sys.exit(main())
