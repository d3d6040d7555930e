"""Build and drive the public Emu reference (baaivision/Emu @ 13c395e) next to genfleet, for bench_emu.py.

No reference code lives here: the reference is imported at run time from a folder given on the command
line (`--reference PATH`, holding the repository's `Emu2/emu/` and `Emu1/models/`), with the compatibility
stubs of `--ref-stubs PATH` (transformers-5 gaps, an SDPA stand-in for xformers, the t5-base config; see
that folder's README). This module only

- builds the reference's own modules (Emu2 `EmuModel` + `EmuVisualGeneration`; Emu1 `Emu` +
  `EmuGenerationPipeline`) with parameters on the meta device (`empty_weights`),
- gives them genfleet's random weights: every tensor genfleet has is *shared* (the same storage), the few
  the reference has beyond them (lm_head, Emu1's unused EVA head/norm and T5 embedding) are drawn fresh,
- and calls the reference's own entry points: `_prepare_and_encode_inputs` (its recompute loop, batch 1,
  its "" branch as it forms it) and the pipeline's `forward` (the whole t2i at batch 1).

The pipelines' unet / vae / safety checker are the diffusers modules genfleet built (the same library
classes the reference instantiates), so both sides run the same denoiser weights.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

_FALLBACKS = ("timm", "timm.models.layers", "torchvision", "torchvision.transforms", "peft")
_FALLEN_BACK: set[str] = set()
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def activate(ref_dir: str | Path, stubs_dir: str | Path) -> types.SimpleNamespace:
    """Put the reference and its stubs on sys.path and import what the benchmark drives."""
    ref_dir, stubs_dir = Path(ref_dir).resolve(), Path(stubs_dir).resolve()
    for need in (ref_dir / "Emu2" / "emu" / "emu.py", ref_dir / "Emu1" / "models" / "modeling_emu.py",
                 stubs_dir / "emu_ref_compat.py"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found (--reference holds Emu2/emu and Emu1/models; "
                                    "--ref-stubs holds emu_ref_compat.py)")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the pipelines wrap their loops in tqdm
    if str(stubs_dir) not in sys.path:
        sys.path.insert(0, str(stubs_dir))
    import diffusers  # noqa: F401
    import emu_ref_compat
    import transformers.image_utils  # noqa: F401  (decides its torchvision backend before any fallback exists)

    # packages the GPU machine has but a CPU machine may not: small stand-ins, only where missing
    fallback = stubs_dir / "cpu_fallback"
    missing = sorted({m.split(".")[0] for m in _FALLBACKS if importlib.util.find_spec(m.split(".")[0]) is None})
    if missing:
        sys.path.insert(0, str(fallback))
        try:
            for m in _FALLBACKS:
                if m.split(".")[0] in missing:
                    importlib.import_module(m)
        finally:
            sys.path.remove(str(fallback))
    _FALLEN_BACK.update(missing)
    for sub in ("Emu1", "Emu2"):  # Emu2's package is `emu`, Emu1's is `models`
        if str(ref_dir / sub) not in sys.path:
            sys.path.insert(1, str(ref_dir / sub))
    ns = types.SimpleNamespace(ref_dir=ref_dir, compat=emu_ref_compat, fallbacks=sorted(_FALLEN_BACK))
    ns.emu2_conf = importlib.import_module("emu.conf.emu_conf")
    ns.emu2_emu = importlib.import_module("emu.emu")
    ns.emu2_diffusion = importlib.import_module("emu.diffusion")
    ns.emu1_emu = importlib.import_module("models.modeling_emu")
    ns.emu1_pipeline = importlib.import_module("models.pipeline")
    return ns


@contextlib.contextmanager
def empty_weights():
    """Parameters are created on the meta device (buffers stay where they are made, so e.g. RoPE
    tables keep their values); transformers' mean-resizing of new token rows, which needs real values,
    is skipped (those rows are overwritten by the shared weights anyway)."""
    from transformers.modeling_utils import PreTrainedModel

    register, resize = nn.Module.register_parameter, PreTrainedModel.resize_token_embeddings

    def register_meta(self, name, param):
        register(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def resize_plain(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        return resize(self, new_num_tokens, pad_to_multiple_of, mean_resizing=False)

    nn.Module.register_parameter, PreTrainedModel.resize_token_embeddings = register_meta, resize_plain
    try:
        yield
    finally:
        nn.Module.register_parameter, PreTrainedModel.resize_token_embeddings = register, resize


def share_weights(ref: nn.Module, tensors: dict[str, torch.Tensor], device, dtype,
                  init: Callable[[str, torch.Tensor], None]) -> list[str]:
    """Every parameter of `ref` becomes tensors[name] (shared storage, shapes checked) or, where genfleet
    has no such tensor, a fresh one (init(name, t)); buffers move to `device` (RoPE inv_freq etc.).
    Returns the names drawn fresh. Raises if any of `tensors` found no home."""
    used, fresh = set(), []
    for mod_name, mod in ref.named_modules():
        for leaf, p in list(mod._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            t = tensors.get(name)
            if t is None:
                t = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
                init(name, t)
                fresh.append(name)
            elif tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"reference {name} has shape {tuple(p.shape)}, genfleet's {tuple(t.shape)}")
            used.add(name)
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        for leaf, b in list(mod._buffers.items()):
            if b is None:
                continue
            if b.is_meta:
                raise ValueError(f"reference buffer {mod_name}.{leaf} is on meta and cannot be rebuilt")
            mod._buffers[leaf] = b.to(device)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{len(unused)} genfleet tensors have no reference counterpart, e.g. {unused[:3]}")
    return fresh


def reference_names(ours: nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """genfleet module names -> the reference's (EmuModel / Emu attribute paths)."""
    out = {}
    for name, t in ours.state_dict(keep_vars=True).items():
        if name.startswith("decoder."):
            name = "decoder.lm.model." + name[len("decoder."):]
        elif variant == "emu1" and name == "stu_regress_head.weight":
            name = "decoder.lm.stu_regress_head.weight"
        out[name] = t.detach()
    return out


def _llama_dir(src: Path, dest: Path, llm) -> Path:
    """A copy of the reference's llama_config folder whose config.json has genfleet's (tiny) LLM shape."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in _TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=llm.dim, intermediate_size=llm.ffn_dim, num_attention_heads=llm.n_heads,
               num_hidden_layers=llm.n_layers, rms_norm_eps=llm.rms_eps)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _clip_processor(ns, dec, tiny: bool):
    """The safety checker's CLIP preprocessing: Emu2's conf/diffusion_config/feature_extractor (the SD one,
    224²; Emu1's release ships the same); --tiny: genfleet's tiny config (the tiny checker is 32²)."""
    from transformers import CLIPImageProcessor

    if tiny:
        return CLIPImageProcessor.from_dict(dict(dec.feature_extractor))
    return CLIPImageProcessor.from_pretrained(str(ns.ref_dir / "Emu2" / "emu" / "conf" / "diffusion_config" / "feature_extractor"))


def emu2_pipeline(ns, ours, dec, *, tiny: bool, workdir: Path, device, dtype, init) -> tuple[nn.Module, list[str]]:
    """The reference's EmuModel (its EVA-CLIP, transformers LlamaForCausalLM, project_up/down) and its
    EmuVisualGeneration around genfleet's unet / vae / safety checker. Released shapes come from the
    reference's own defaults (CLIPVisionCfg, conf/llama_config); --tiny takes genfleet's tiny shapes."""
    conf = ns.emu2_conf
    conf_dir = ns.ref_dir / "Emu2" / "emu" / "conf"
    vision, text = conf.CLIPVisionCfg(), conf.TextDecoderCfg()
    if tiny:
        e = ours.params.eva
        vision = conf.CLIPVisionCfg(image_size=e.image_size, patch_size=e.patch_size, width=e.width, layers=e.layers,
                                    head_width=e.head_dim, mlp_ratio=e.mlp_dim / e.width,
                                    n_query=ours.params.n_query, v_query=ours.params.n_query)
        text = conf.TextDecoderCfg(llama_config_path=str(_llama_dir(conf_dir / "llama_config", workdir / "emu2-llama",
                                                                    ours.params.llm)))
    with empty_weights():
        enc = ns.emu2_emu.EmuModel(vision, text)
    fresh = share_weights(enc, reference_names(ours, "emu2"), device, dtype, init)
    from diffusers import EulerDiscreteScheduler

    diffusion = conf_dir / "diffusion_config"
    pipe = ns.emu2_diffusion.EmuVisualGeneration(
        multimodal_encoder=enc, scheduler=EulerDiscreteScheduler.from_pretrained(str(diffusion / "scheduler")),
        unet=dec.unet, vae=dec.vae, feature_extractor=_clip_processor(ns, dec, tiny), safety_checker=dec.safety_checker)
    return pipe.eval(), fresh


def emu1_pipeline(ns, ours, dec, *, tiny: bool, workdir: Path, device, dtype, init) -> tuple[nn.Module, list[str]]:
    """The reference's Emu (EVA-CLIP-g, its T5-copy CausalFormer, LlamaForReg) inside its
    EmuGenerationPipeline. The pipeline's __init__ reads weights from disk; here its attributes are
    set to what that __init__ would make (genfleet's unet / vae / safety checker, the released PNDM
    config, the CLIP processor). Emu1 reads `models/llama_config` relative to the working directory
    (it is meant to run from Emu1/): the build runs there (or, --tiny, in a folder with tiny configs)."""
    from diffusers import PNDMScheduler

    from modeling.emu.decoder_presets import PNDM

    emu1_dir = ns.ref_dir / "Emu1"
    model_cfg = json.loads((emu1_dir / "models" / "Emu-14B.json").read_text())
    cwd = emu1_dir
    t5_dir = ns.compat.T5_BASE_DIR
    if tiny:
        p = ours.params
        cwd = workdir / "emu1-cwd"
        _llama_dir(emu1_dir / "models" / "llama_config", cwd / "models" / "llama_config", p.llm)
        model_cfg["embed_dim"] = p.clip_embed_dim
        model_cfg["vision_cfg"].update(image_size=p.eva.image_size, layers=p.eva.layers, width=p.eva.width,
                                       head_width=p.eva.head_dim, mlp_ratio=p.eva.mlp_dim / p.eva.width,
                                       patch_size=p.eva.patch_size)
        model_cfg["vladapter_cfg"]["n_causal"] = model_cfg["multimodal_cfg"]["n_causal"] = p.n_causal
        c = p.cformer
        t5_dir = workdir / "t5-tiny"
        t5_dir.mkdir(parents=True, exist_ok=True)
        t5 = json.loads((ns.compat.T5_BASE_DIR / "config.json").read_text())
        t5.update(d_model=c.d_model, d_kv=c.d_kv, num_heads=c.n_heads, d_ff=c.d_ff, num_layers=c.n_layers,
                  relative_attention_num_buckets=c.num_buckets, relative_attention_max_distance=c.max_distance,
                  vocab_size=c.vocab_size)
        (t5_dir / "config.json").write_text(json.dumps(t5))
    args = types.SimpleNamespace(instruct=False, device=torch.device(device))
    old_cwd, old_t5 = os.getcwd(), ns.compat.T5_BASE_DIR
    os.chdir(cwd)
    ns.compat.T5_BASE_DIR = t5_dir
    try:
        with empty_weights():
            enc = ns.emu1_emu.Emu(**model_cfg, cast_dtype=torch.float, args=args)  # as EmuGenerationPipeline.prepare_emu
    finally:
        os.chdir(old_cwd)
        ns.compat.T5_BASE_DIR = old_t5
    fresh = share_weights(enc, reference_names(ours, "emu1"), device, dtype, init)
    cls = ns.emu1_pipeline.EmuGenerationPipeline
    pipe = cls.__new__(cls)
    nn.Module.__init__(pipe)
    pipe.unet, pipe.vae, pipe.safety_checker = dec.unet, dec.vae, dec.safety_checker
    pipe.scheduler = PNDMScheduler.from_config(PNDM)
    pipe.feature_extractor = _clip_processor(ns, dec, tiny)
    pipe.emu_encoder = enc
    pipe.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    pipe.transform = None  # image prompts only; the benchmark's prompts are text
    return pipe.eval(), fresh


def encode(pipe, variant: str, text: str, guidance: bool = True) -> torch.Tensor:
    """The reference's whole autoregressive stage for one prompt: [cond; uncond] embeddings.
    Emu2 caches its "" branch on the pipeline after the first call; Emu1 batches [prompt, ""] every call."""
    if variant == "emu2":
        return pipe._prepare_and_encode_inputs([text], guidance)
    dev = pipe.emu_encoder.ln_visual.weight
    return pipe._prepare_and_encode_inputs([text], dev.device, dev.dtype, guidance)


def t2i(pipe, text: str, *, size: int, steps: int, guidance: float):
    """The reference pipeline's forward (batch 1): encode, denoise, VAE decode, safety checker, PIL."""
    return pipe(inputs=[text], height=size, width=size, num_inference_steps=steps, guidance_scale=guidance)


def tokenizer_model(ref_dir: str | Path, variant: str) -> Path:
    """The LLaMA SentencePiece model both references tokenise with (genfleet's slow path reads it too)."""
    sub = ("Emu2", "emu", "conf", "llama_config") if variant == "emu2" else ("Emu1", "models", "llama_config")
    return Path(ref_dir).joinpath(*sub, "tokenizer.model")
