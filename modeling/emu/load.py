"""Find, check and load an Emu multimodal encoder in its released layout.

    Emu2-Gen  model_index.json, multimodal_encoder/{config.json, model.safetensors.index[.bf16].json,
              shards}, tokenizer/{tokenizer.model, added_tokens.json, tokenizer.json}
    Emu1      multimodal_encoder/pytorch_model.bin (bare state dict or {"module": sd}) and, beside it
              in the model folder, the files Emu1's code ships: Emu-14B.json, llama_config/
              (config.json, tokenizer.model), cformer_t5_config.json (the t5-base config)

Modules are built on the meta device; each tensor is read on its own (safetensors `safe_open`,
or an mmap'd weights_only torch.load) straight to the target device and dtype, then assigned.
Loading is strict: every module tensor must come from the checkpoint, and every checkpoint
tensor is either used, or one of the known unused ones (checked by shape, not materialised):
the LLM head, Emu1's EVA norm/head and T5 embed_tokens; the `rotary_emb.inv_freq` buffers are
checked against rope_theta and ignored (RoPE is always computed in float32).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from modeling.emu.config import (
    Emu1Params,
    Emu2Params,
    emu1_params,
    emu2_params,
    read_json,
)
from modeling.emu.encoder import Emu1Encoder, Emu2Encoder
from modeling.emu.layout import EMU1_FILES, EMU2_FILES, map_names, release_layout
from modeling.emu.llama import inv_freq
from modeling.emu.tokens import EmuTokenizer, emu1_tokenizer, emu2_tokenizer

log = logging.getLogger(__name__)

EMU2_INDEXES = ("model.safetensors.index.json", "model.safetensors.index.bf16.json")
INV_FREQ = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def detect_variant(model_dir: str | Path) -> str:
    d = Path(model_dir)
    if (d / "model_index.json").is_file():
        return "emu2"
    if (d / "multimodal_encoder" / "pytorch_model.bin").is_file():
        return "emu1"
    raise FileNotFoundError(
        f"{d}: not an Emu model folder: neither model_index.json (Emu2-Gen) nor multimodal_encoder/pytorch_model.bin (Emu1)"
    )


def emu2_shards(model_dir: str | Path) -> dict[str, Path]:
    """release tensor name -> shard file, from the first index file present."""
    enc = Path(model_dir) / "multimodal_encoder"
    for name in EMU2_INDEXES:
        if (enc / name).is_file():
            weight_map = read_json(enc / name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{enc / name}: no weight_map")
            files = {f: enc / f for f in set(weight_map.values())}
            for f, path in sorted(files.items()):
                if not path.is_file():
                    raise FileNotFoundError(f"missing {f} in {enc} (listed in {name})")
            return {k: files[f] for k, f in weight_map.items()}
    raise FileNotFoundError(f"missing {EMU2_INDEXES[0]} in {enc}")


def encoder_params(model_dir: str | Path, variant: str | None = None) -> Emu1Params | Emu2Params:
    variant = variant or detect_variant(model_dir)
    return emu2_params(model_dir) if variant == "emu2" else emu1_params(model_dir)


def check_layout(model_dir: str | Path, safety_checker: bool = False, tokenizer_mode: str = "slow") -> str:
    """Check (without reading weights) that the folder has every file the encoder, tokenizer and
    diffusion decoder need and that they parse; Emu2 shard headers must list exactly the released
    tensor names and shapes, and the unet's cross-attention width must be the encoder's embedding
    width. Returns the variant. Raises FileNotFoundError / ValueError naming the problem."""
    from modeling.emu.decoder import check_decoder_layout

    d = Path(model_dir)
    variant = detect_variant(d)
    for rel in EMU2_FILES if variant == "emu2" else EMU1_FILES:
        path = d / rel
        if not path.is_file():
            raise FileNotFoundError(f"missing {rel} in {d}")
        if path.suffix == ".json":
            read_json(path)
    params = encoder_params(d, variant)
    if variant == "emu2":
        from safetensors import safe_open

        shards = emu2_shards(d)
        shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(shards.values())):
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        _compare(shapes, release_layout(params), "multimodal_encoder")
    else:
        import zipfile

        if not zipfile.is_zipfile(d / "multimodal_encoder" / "pytorch_model.bin"):
            raise ValueError(f"{d / 'multimodal_encoder' / 'pytorch_model.bin'}: not a torch zip checkpoint")
    load_tokenizer(d, variant, tokenizer_mode)
    check_decoder_layout(d, variant, safety_checker)
    width = params.eva.width if variant == "emu2" else params.llm.dim
    context = read_json(d / "unet" / "config.json").get("cross_attention_dim")
    if context != width:
        raise ValueError(f"{d / 'unet' / 'config.json'}: cross_attention_dim {context} != the {variant} encoder's "
                         f"embedding width {width}")
    return variant


def _compare(found: dict[str, tuple], want: dict[str, tuple], where: str) -> None:
    optional = {k for k in want if INV_FREQ.search(k)}  # transformers > 4.31 no longer saves them
    missing = sorted(set(want) - set(found) - optional)
    unexpected = sorted(set(found) - set(want))
    wrong = sorted(k for k in set(want) & set(found) if tuple(found[k]) != tuple(want[k]))
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where} does not match the model config: {len(missing)} missing {missing[:8]}, "
            f"{len(unexpected)} unexpected {unexpected[:8]}, "
            f"{len(wrong)} wrong shapes {[(k, tuple(found[k]), tuple(want[k])) for k in wrong[:4]]}"
        )


def _check_inv_freq(name: str, t: torch.Tensor, head_dim: int, theta: float) -> None:
    want = inv_freq(head_dim, theta)
    if t.shape != want.shape or not torch.allclose(t.float().cpu(), want, rtol=1e-2, atol=0):
        raise ValueError(f"{name} does not match rope_theta {theta} (head_dim {head_dim}): got {t.flatten()[:4].tolist()}...")


def _assign(module, sd: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ValueError(f"{k}: checkpoint shape {tuple(t.shape)} != model {tuple(expected[k].shape)}")
    module.load_state_dict(sd, strict=True, assign=True)


def _load(model, variant: str, read, shape, names: list[str], device, dtype) -> None:
    """read(name) -> tensor, shape(name) -> its shape without reading it; names: every tensor
    the checkpoint holds (release names)."""
    p = model.params
    want = release_layout(p)
    used, unused = map_names(p)  # release name -> module name(s); release names accepted but unused
    extra = sorted(set(names) - set(want))
    missing = sorted(set(want) - set(names) - {k for k in want if INV_FREQ.search(k)})
    if extra or missing:
        raise ValueError(f"{variant} checkpoint does not match its config: {len(missing)} missing {missing[:8]}, "
                         f"{len(extra)} unexpected {extra[:8]}")
    dev = torch.device(device)
    sd: dict[str, torch.Tensor] = {}
    for name in names:
        if tuple(shape(name)) != tuple(want[name]):
            raise ValueError(f"{name}: checkpoint shape {tuple(shape(name))} != expected {tuple(want[name])}")
        if name in unused:
            if INV_FREQ.search(name):
                _check_inv_freq(name, read(name), p.llm.head_dim, p.llm.rope_theta)
            continue
        t = read(name)
        targets = used[name]
        if len(targets) == 3:  # Emu2's fused [q, 0, v] EVA bias -> q_bias, v_bias
            q, k, v = t.chunk(3)
            if k.abs().max() > 0:
                log.warning("%s: the k third is not zero (max %.3g); dropped (a k bias cancels in softmax)",
                            name, float(k.abs().max()))
            parts = {targets[0]: q, targets[2]: v}
        else:
            parts = {targets[0]: t}
        for mod_name, part in parts.items():
            sd[mod_name] = part.to(device=dev, dtype=dtype if part.is_floating_point() else part.dtype)
    _assign(model, sd)
    log.info("loaded %s encoder: %d tensors, %d accepted unused", variant, len(sd), len(unused))


def load_encoder(model_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Emu1Encoder | Emu2Encoder:
    d = Path(model_dir)
    variant = detect_variant(d)
    params = encoder_params(d, variant)
    with torch.device("meta"):
        model = Emu2Encoder(params) if variant == "emu2" else Emu1Encoder(params)
    if variant == "emu2":
        from safetensors import safe_open

        shards = emu2_shards(d)
        dev = torch.device(device)
        handles = {path: safe_open(str(path), framework="pt", device=str(dev) if dev.type != "cpu" else "cpu")
                   for path in set(shards.values())}
        listed = {k for path, f in handles.items() for k in f.keys()}
        if listed != set(shards):
            raise ValueError(f"{d / 'multimodal_encoder'}: the index and the shards list different tensors "
                             f"({sorted(listed ^ set(shards))[:8]})")
        _load(model, variant, lambda k: handles[shards[k]].get_tensor(k),
              lambda k: handles[shards[k]].get_slice(k).get_shape(), sorted(shards), device, dtype)
    else:
        path = d / "multimodal_encoder" / "pytorch_model.bin"
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        if isinstance(ckpt, dict) and "module" in ckpt and isinstance(ckpt["module"], dict):
            ckpt = ckpt["module"]
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: not a state dict (got {type(ckpt).__name__})")
        _load(model, variant, ckpt.__getitem__, lambda k: ckpt[k].shape, sorted(ckpt), device, dtype)
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: str | Path, variant: str | None = None, mode: str = "slow") -> EmuTokenizer:
    """Emu2: tokenizer/ (mode slow = the reference's LlamaTokenizer, fast = the release's
    tokenizer.json); Emu1: llama_config/ (slow only, as its reference)."""
    d = Path(model_dir)
    variant = variant or detect_variant(d)
    if variant == "emu2":
        cfg = read_json(d / "multimodal_encoder" / "config.json")
        return emu2_tokenizer(d / "tokenizer", int(cfg.get("vision_config", {}).get("n_query", 64)), mode)
    if mode != "slow":
        raise ValueError(f"Emu1 has only the slow LlamaTokenizer, got mode {mode!r}")
    emu = read_json(d / "Emu-14B.json")
    return emu1_tokenizer(d / "llama_config", int(emu.get("vladapter_cfg", {}).get("n_causal", 32)))

