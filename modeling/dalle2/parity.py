"""Replay a DALLE2 parity kit: `python -m modeling.dalle2.parity KIT_DIR`.

A kit holds the checkpoints (prior.pth / decoder.pth, configs inside or beside them as
prior_config.json / decoder_config.json), kit.json (cases) and tensors.safetensors (inputs,
every recorded random draw, reference outputs). Exit status 0 iff every case's relative L2
error is <= 1e-4.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .checkpoint import checkpoint_version, config_section, read_checkpoint, split_checkpoint
from .models import build_decoder, build_prior
from .sampling import replay_noise, sample_decoder, sample_prior

TOLERANCE = 1e-4
PRIOR_PARAMS = {"timesteps", "cond_scale", "eta", "num_samples_per_batch"}
DECODER_PARAMS = {"cond_scale", "stop_at_unet_number", "start_at_unet_number", "inpaint_resample_times",
                  "sample_timesteps", "timesteps", "eta", "ddim_sampling_eta", "lowres_noise_sample_level"}


def _find(kit: Path, stem: str) -> Path:
    for suffix in (".pth", ".pt", ".ckpt", ".safetensors"):
        if (kit / (stem + suffix)).exists():
            return kit / (stem + suffix)
    raise FileNotFoundError(f"{kit}: no {stem}.pth / .safetensors")


def load_kit_model(kit: Path, kind: str):
    obj = read_checkpoint(_find(kit, kind))
    sd, section, _ = split_checkpoint(obj, kind)
    if section is None:
        cfg = kit / f"{kind}_config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{kit}: {kind} checkpoint has no config and {cfg.name} is missing")
        section = config_section(json.loads(cfg.read_text()), kind)
    build = build_prior if kind == "prior" else build_decoder
    return build(section, sd, version=checkpoint_version(obj))


def _inputs(case: dict, tensors: dict) -> dict:
    out = {}
    for name in case.get("inputs", []):
        out[name.rsplit(".in.", 1)[-1]] = tensors[name]
    return out


def run_case(case: dict, tensors: dict, models: dict) -> torch.Tensor:
    kind, params = case["kind"], dict(case.get("params", {}))
    inp = _inputs(case, tensors)
    noise = replay_noise([tensors[n] for n in case.get("noise_stream", [])])
    used = {"n": 0}
    counted = lambda shape: (used.__setitem__("n", used["n"] + 1), noise(shape))[1]
    if kind == "prior":
        unknown = set(params) - PRIOR_PARAMS
        if unknown:
            raise ValueError(f"unknown prior params {sorted(unknown)}")
        out = sample_prior(models["prior"], inp["text_embed"], inp.get("text_encodings"), counted,
                           steps=params.get("timesteps") or models["prior"].params.timesteps,  # p_sample_loop default
                           cond_scale=params.get("cond_scale", 1.0),
                           eta=params.get("eta", 1.0), num_samples_per_batch=params.get("num_samples_per_batch", 1))
    elif kind == "decoder":
        unknown = set(params) - DECODER_PARAMS
        if unknown:
            raise ValueError(f"unknown decoder params {sorted(unknown)}")
        dec = models["decoder"]
        steps = params.get("sample_timesteps", params.get("timesteps"))
        if steps is not None and not isinstance(steps, list):
            steps = [steps] * len(dec.unets)
        eta = params.get("eta", params.get("ddim_sampling_eta"))
        kw = {}
        if "inpaint_image" in inp:
            kw.update(inpaint_image=inp["inpaint_image"], inpaint_mask=inp["inpaint_mask"].bool(),
                      inpaint_resample_times=params.get("inpaint_resample_times", 5))
        if "lowres_noise_sample_level" in params:
            kw["lowres_noise_level"] = params["lowres_noise_sample_level"]
        out = sample_decoder(list(dec.unets), dec.params, inp.get("image_embed"), inp.get("text_encodings"), counted,
                             cond_scale=params.get("cond_scale", 1.0), steps=steps,
                             start_at_unet_number=params.get("start_at_unet_number", 1),
                             stop_at_unet_number=params.get("stop_at_unet_number"), image=inp.get("image"),
                             eta=eta, **kw)
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    if used["n"] != len(case.get("noise_stream", [])):
        raise ValueError(f"sampler drew {used['n']} noise tensors, the reference drew {len(case['noise_stream'])}")
    return out


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


def run_kit(kit: str | Path) -> list[tuple[str, float | None, str]]:
    """-> [(case id, relative L2 error or None, message)]."""
    kit = Path(kit)
    spec = json.loads((kit / "kit.json").read_text())
    tensors = load_file(str(kit / "tensors.safetensors"))
    models = {k: load_kit_model(kit, k) for k in sorted({c["kind"] for c in spec["cases"]}) if k in ("prior", "decoder")}
    results = []
    with torch.no_grad():
        for case in spec["cases"]:
            try:
                err = rel_l2(run_case(case, tensors, models), tensors[case["output"]])
                results.append((case["id"], err, "ok" if err <= TOLERANCE else "FAIL"))
            except Exception as e:  # report every case, fail the kit
                results.append((case["id"], None, f"ERROR {type(e).__name__}: {e}"))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kit_dir")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = run_kit(args.kit_dir)
    for cid, err, msg in results:
        print(f"{cid:40s} rel_l2={'n/a' if err is None else f'{err:.3e}'}  {msg}")
    ok = all(err is not None and err <= TOLERANCE for _, err, _ in results)
    print(f"{'PASS' if ok else 'FAIL'}: {sum(e is not None and e <= TOLERANCE for _, e, _ in results)}/{len(results)} "
          f"cases within {TOLERANCE:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
