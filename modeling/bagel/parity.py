"""Check this implementation against a parity kit recorded from the reference.

    python -m modeling.bagel.parity KIT_DIR [--batched]

Every case runs with the kit's recorded noise / latents / pixel inputs. Exit 0 only if
every image case has final-latent relative L2 error <= 1e-4 and output pixels within
+-1, and every understand case yields the same token ids. Everything (shapes, settings,
special ids, transform rules) is read from the kit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling.bagel import sampling as S
from modeling.bagel.load import SpecialTokens, load_ae, load_bagel
from modeling.bagel.transforms import ResizeRule, resized_size

LATENT_TOL, PIXEL_TOL = 1e-4, 1


def image_params(p: dict) -> S.ImageParams:
    return S.ImageParams(
        cfg_text_scale=float(p.get("cfg_text_scale", 1.0)),
        cfg_img_scale=float(p.get("cfg_img_scale", 1.0)),
        cfg_interval=tuple(float(v) for v in p.get("cfg_interval", (0.0, 1.0))),
        cfg_renorm_type=p.get("cfg_renorm_type", "global"),
        cfg_renorm_min=float(p.get("cfg_renorm_min", 0.0)),
        timestep_shift=float(p.get("timestep_shift", 1.0)),
        num_timesteps=int(p.get("num_timesteps", 50)),
    )


def vit_grid(kit: dict, kit_dir: Path, case: dict) -> tuple[int, int]:
    """The ViT patch grid of the case's input image (by the kit's resize rules)."""
    with Image.open(kit_dir / case["input_image"]) as img:
        size = img.size
    size = resized_size(*size, ResizeRule(**kit["vae_transform"]))
    vit = ResizeRule(**kit["vit_transform"])
    w, h = resized_size(*size, vit)
    return h // vit.stride, w // vit.stride


def build_rows(kit: dict, kit_dir: Path, tensors: dict, cases: list[dict]):
    rows = []
    for c in cases:
        t = lambda name: tensors[f"{c['id']}.{name}"]  # noqa: E731
        if c["kind"] == "understand":
            n = int(c["params"].get("max_think_token_n", 1000))
            g = torch.Generator().manual_seed(0)
            rows.append(S.TextRow(c["prompt_ids"], t("vit_packed_pixel_values"), vit_grid(kit, kit_dir, c),
                                  max_new_tokens=n - 1, do_sample=bool(c["params"].get("do_sample", False)),
                                  temperature=float(c["params"].get("text_temperature", 0.3)), generator=g))
            continue
        p = image_params(c["params"])
        if c["kind"] == "edit":
            H, W = t("vae_pixels").shape[-2:]
            rows.append(S.ImageRow(c["prompt_ids"], H, W, t("init_noise"), p, t("vae_latent")[0],
                                   t("vit_packed_pixel_values"), vit_grid(kit, kit_dir, c)))
        else:
            H, W = c["params"].get("image_shapes", (1024, 1024))
            rows.append(S.ImageRow(c["prompt_ids"], int(H), int(W), t("init_noise"), p))
    return rows


def vae_note(ae, tensors: dict, cid: str) -> str:
    """Informative: the noise our encoder implies for the recorded posterior sample (~N(0, 1))."""
    with torch.no_grad():
        mean, logvar = ae.encoder(tensors[f"{cid}.vae_pixels"].float()).chunk(2, dim=1)
    z = tensors[f"{cid}.vae_latent"] / ae.params.scale_factor + ae.params.shift_factor
    eps = (z - mean) / torch.exp(0.5 * logvar)
    return f"  (VAE: implied posterior noise mean {float(eps.mean()):+.3f} std {float(eps.std()):.3f})"


def run(kit_dir: str | Path, batched: bool = False) -> tuple[bool, list[str]]:
    kit_dir = Path(kit_dir)
    kit = json.loads((kit_dir / "kit.json").read_text())
    tensors = load_file(str(kit_dir / "tensors.safetensors"))
    special = SpecialTokens(**{k: int(v) for k, v in kit["special_token_ids"].items()})
    model, ae = load_bagel(kit_dir), load_ae(kit_dir)
    cases = kit["cases"]
    rows = build_rows(kit, kit_dir, tensors, cases)
    img = [i for i, c in enumerate(cases) if c["kind"] != "understand"]
    und = [i for i, c in enumerate(cases) if c["kind"] == "understand"]
    results: dict[int, object] = {}
    groups = [img, und] if batched else [[i] for i in img + und]
    for g in groups:
        if not g:
            continue
        if cases[g[0]]["kind"] == "understand":
            outs = S.generate_text(model, [rows[i] for i in g], special)
        else:
            outs = S.denoise(model, [rows[i] for i in g], special)
        results.update(zip(g, outs))
    ok, lines = True, []
    for i, c in enumerate(cases):
        if c["kind"] == "understand":
            want = list(c["output_text_ids"])
            good = results[i] == want
            lines.append(f"{c['id']:<28} understand  ids {'match' if good else 'DIFFER'} ({len(want)} tokens)"
                         + ("" if good else f": got {results[i]} want {want}"))
        else:
            ref = tensors[f"{c['id']}.final_latent"].float()
            x = results[i].cpu()
            rel = float((x - ref).norm() / ref.norm().clamp_min(1e-12))
            r = rows[i]
            pix = S.decode_to_uint8(ae, S.unpack_latent(model, x, r.height, r.width)).numpy().astype(np.int16)
            want = np.asarray(Image.open(kit_dir / c["output_image"]).convert("RGB")).astype(np.int16)
            dmax = int(np.abs(pix - want).max()) if pix.shape == want.shape else 10**9
            good = rel <= LATENT_TOL and dmax <= PIXEL_TOL
            lines.append(f"{c['id']:<28} {c['kind']:<10}  latent rel L2 {rel:.2e}  max pixel diff {dmax}"
                         + ("" if good else "  FAIL") + (vae_note(ae, tensors, c["id"]) if c["kind"] == "edit" else ""))
        ok &= good
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kit_dir")
    ap.add_argument("--batched", action="store_true", help="run all image cases in one batch")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ok, lines = run(args.kit_dir, args.batched)
    print("\n".join(lines))
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
