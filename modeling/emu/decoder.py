"""Load the diffusion decoder of Emu2-Gen / Emu1 (diffusers UNet, VAE, scheduler, safety checker).

    unet/               config.json + diffusion_pytorch_model.bf16.safetensors (Emu2) | .bin (Emu1)
    vae/                config.json + the same weight file names
    scheduler/          scheduler_config.json (EulerDiscreteScheduler | PNDMScheduler)
    safety_checker/     config.json (transformers CLIPConfig) + model.bf16.safetensors | pytorch_model.bin
    feature_extractor/  preprocessor_config.json (CLIP image processor; applied in diffusion.safety_inputs)

Modules are built from each folder's config on the meta device (never `from_pretrained`), every
tensor goes straight to the target device and dtype and is assigned; loading is strict (a missing
or unexpected tensor, or a wrong shape, is a ValueError). `.bin` files load with
`torch.load(weights_only=True)`. No code from a checkpoint folder is run.

    check_decoder_layout(model_dir, variant, safety_checker=False) -> None   (no weights read)
    load_decoder(model_dir, variant, device="cpu", dtype=float32, safety_checker=False) -> EmuDecoder
    write_tiny_decoder(directory, variant, context_dim, seed=0) -> Path
    build_unet / build_vae / build_safety_checker(cfg) -> module on meta; release_names(kind, sd)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modeling.emu.decoder_presets import tiny_configs

VARIANTS = ("emu1", "emu2")
SCHEDULERS = {"emu2": "EulerDiscreteScheduler", "emu1": "PNDMScheduler"}
# the reference pipelines' defaults (height, width, steps, guidance)
DEFAULTS = {"emu2": (1024, 1024, 50, 3.0), "emu1": (512, 512, 50, 7.5)}
WEIGHTS = {  # per folder, in order of preference
    "emu2": {"model": ("diffusion_pytorch_model.bf16.safetensors", "diffusion_pytorch_model.safetensors"),
             "safety_checker": ("model.bf16.safetensors", "model.safetensors")},
    "emu1": {"model": ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
             "safety_checker": ("pytorch_model.bin", "model.safetensors")},
}
CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json", "scheduler": "scheduler/scheduler_config.json",
           "safety_checker": "safety_checker/config.json",
           "feature_extractor": "feature_extractor/preprocessor_config.json"}
_SC_RELEASE, _SC_OURS = "vision_model.vision_model.", "vision_model."  # transformers ≤ 4.x vs 5 CLIPVisionModel


@dataclass
class EmuDecoder:
    variant: str  # "emu1" | "emu2"
    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    scheduler_config: dict
    safety_checker: nn.Module | None = None  # diffusers StableDiffusionSafetyChecker
    feature_extractor: dict | None = None  # preprocessor_config.json (CLIP image processor)
    configs: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def context_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def make_scheduler(self):
        """A fresh scheduler (they are stateful: one per denoise call)."""
        from diffusers import EulerDiscreteScheduler, PNDMScheduler

        cls = EulerDiscreteScheduler if self.variant == "emu2" else PNDMScheduler
        return cls.from_config(self.scheduler_config)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'emu1' or 'emu2', got {variant!r}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.parent.name}/{path.name} in {path.parent.parent}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def weight_path(model_dir: str | Path, variant: str, folder: str) -> Path:
    names = WEIGHTS[variant]["safety_checker" if folder == "safety_checker" else "model"]
    for name in names:
        if (Path(model_dir) / folder / name).is_file():
            return Path(model_dir) / folder / name
    raise FileNotFoundError(f"missing {folder}/{names[0]} in {model_dir} (also looked for {', '.join(names[1:])})")


def _layout(model_dir: str | Path, variant: str, safety_checker: bool) -> tuple[dict, dict]:
    _check_variant(variant)
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"decoder folder {d} does not exist")
    parts = ("unet", "vae", "scheduler") + (("safety_checker", "feature_extractor") if safety_checker else ())
    cfgs = {k: _read_json(d / CONFIGS[k]) for k in parts}
    if "feature_extractor" not in cfgs and (d / CONFIGS["feature_extractor"]).is_file():  # for safety_inputs
        cfgs["feature_extractor"] = _read_json(d / CONFIGS["feature_extractor"])
    want = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": SCHEDULERS[variant]}
    for k, cls in want.items():
        got = cfgs[k].get("_class_name")
        if got not in (None, cls):
            raise ValueError(f"{d / CONFIGS[k]}: _class_name {got!r}, {variant} needs {cls!r}")
    text_time = cfgs["unet"].get("addition_embed_type") == "text_time"
    if text_time != (variant == "emu2"):
        raise ValueError(f"{d / CONFIGS['unet']}: addition_embed_type {cfgs['unet'].get('addition_embed_type')!r} "
                         f"({variant} needs {'text_time' if variant == 'emu2' else None!r})")
    if safety_checker and "vision_config" not in cfgs["safety_checker"]:
        raise ValueError(f"{d / CONFIGS['safety_checker']}: not a CLIPConfig (no vision_config)")
    try:  # the scheduler is cheap to build: its values are checked too
        EmuDecoder(variant, None, None, cfgs["scheduler"]).make_scheduler().set_timesteps(2)
    except Exception as e:
        raise ValueError(f"{d / CONFIGS['scheduler']}: {type(e).__name__}: {e}") from None
    paths = {k: weight_path(d, variant, k) for k in ("unet", "vae") + (("safety_checker",) if safety_checker else ())}
    return cfgs, paths


def check_decoder_layout(model_dir: str | Path, variant: str, safety_checker: bool = False) -> None:
    """Files present and configs parseable (no weights read): FileNotFoundError / ValueError naming the file."""
    _layout(model_dir, variant, safety_checker)


def build_unet(cfg: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(cfg)


def build_vae(cfg: dict) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(cfg)


def build_safety_checker(cfg: dict) -> nn.Module:
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig

    with torch.device("meta"):
        return StableDiffusionSafetyChecker(CLIPConfig.from_dict(cfg))


def release_names(kind: str, sd: dict) -> dict:
    """Our module's state dict under the released tensor names (the safety checker's CLIP tower
    is `vision_model.vision_model.*` in the release, `vision_model.*` in transformers 5)."""
    if kind != "safety_checker" or any(k.startswith(_SC_RELEASE) for k in sd):
        return dict(sd)
    return {(_SC_RELEASE + k[len(_SC_OURS):] if k.startswith(_SC_OURS) else k): v for k, v in sd.items()}


def _module_names(kind: str, sd: dict, module_keys: set[str]) -> dict:
    if kind != "safety_checker" or any(k.startswith(_SC_RELEASE) for k in module_keys):
        return sd
    return {(_SC_OURS + k[len(_SC_RELEASE):] if k.startswith(_SC_RELEASE) else k): v for k, v in sd.items()}


def read_weights(path: Path, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors cast to `dtype`, all on `device`; `.bin` via torch.load(weights_only=True)."""
    cast = lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
            return {k: cast(f.get_tensor(k)) for k in f.keys()}
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors")
    return {k: cast(v) for k, v in obj.items()}


def load_strict(module: nn.Module, kind: str, sd: dict[str, torch.Tensor], where: Path, device) -> nn.Module:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    sd = _module_names(kind, sd, set(want))
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or extra:
        raise ValueError(f"{where}: {len(missing)} missing tensors {missing[:3]}, {len(extra)} unexpected {extra[:3]}")
    bad = [(k, tuple(sd[k].shape), want[k]) for k in want if tuple(sd[k].shape) != want[k]]
    if bad:
        k, got, exp = bad[0]
        raise ValueError(f"{where}: {len(bad)} tensors of the wrong shape, e.g. {k} {got} (model wants {exp})")
    module.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(module.named_buffers()):  # non-persistent buffers are still on meta
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise ValueError(f"{kind}: buffer {name} is not in {where} and cannot be rebuilt")
        owner, leaf = module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        owner.register_buffer(leaf, torch.arange(buf.shape[-1], device=device).expand(buf.shape), persistent=False)
    return module.eval().requires_grad_(False)


def load_decoder(model_dir: str | Path, variant: str, device="cpu", dtype: torch.dtype = torch.float32,
                 safety_checker: bool = False) -> EmuDecoder:
    cfgs, paths = _layout(model_dir, variant, safety_checker)
    mods = {}
    for kind, build in (("unet", build_unet), ("vae", build_vae), ("safety_checker", build_safety_checker)):
        if kind in paths:
            mods[kind] = load_strict(build(cfgs[kind]), kind, read_weights(paths[kind], device, dtype),
                                     paths[kind], device)
    return EmuDecoder(variant=variant, unet=mods["unet"], vae=mods["vae"], scheduler_config=cfgs["scheduler"],
                      safety_checker=mods.get("safety_checker"), feature_extractor=cfgs.get("feature_extractor"),
                      configs=cfgs)


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
            elif name.endswith(".weight"):  # 1-D weights are the norms' scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def write_tiny_decoder(directory: str | Path, variant: str, context_dim: int, seed: int = 0) -> Path:
    """Tiny random unet/, vae/, scheduler/, safety_checker/, feature_extractor/ in the released
    layout and file names (float32 contents); the unet's cross-attention width is `context_dim`.
    The safety checker's thresholds are above 1, so it never fires (as in the parity kits)."""
    _check_variant(variant)
    cfgs = tiny_configs(variant, context_dim)
    out = Path(directory)
    gen = torch.Generator().manual_seed(seed)
    builders = {"unet": build_unet, "vae": build_vae, "safety_checker": build_safety_checker}
    for kind, build in builders.items():
        module = build(cfgs[kind]).to_empty(device="cpu")
        _randomize(module, gen)
        sd = {k: v.contiguous() for k, v in module.state_dict().items()}
        if kind == "safety_checker":
            with torch.no_grad():
                sd["concept_embeds_weights"].fill_(1.5)
                sd["special_care_embeds_weights"].fill_(1.5)
        sd = release_names(kind, sd)
        name = WEIGHTS[variant]["safety_checker" if kind == "safety_checker" else "model"][0]
        (out / kind).mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors"):
            save_file(sd, str(out / kind / name))
        else:
            torch.save(sd, out / kind / name)
    for kind in ("unet", "vae", "scheduler", "safety_checker", "feature_extractor"):
        (out / CONFIGS[kind]).parent.mkdir(parents=True, exist_ok=True)
        (out / CONFIGS[kind]).write_text(json.dumps(cfgs[kind], indent=2))
    return out
