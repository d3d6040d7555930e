"""Check this implementation against an Emu parity kit recorded from the reference.

    python -m modeling.emu.parity KIT_DIR [--batched] [--llm-only]

Emu1 or Emu2 is read off kit.json (`reference`/`layout`) and checked against the model folder.
Per case: tokenisation (slow path vs prompt_ids, fast path vs prompt_ids_fast, and the generation
layout vs the recorded LLM input ids), the EVA transform and image embeddings, then the LLM stage
from the recorded ids and our own image embeddings (regressed, step_embeds, last_hidden,
inputs_embeds of every row, the "" guidance row computed once), then the diffusion side
(modeling.emu.diffusion.decoder_case_errors) on our cond/uncond with the kit's noise stream
replayed: final latent, decoded image, safety-checker input, output png. Exit 0 only if every relative L2 error is <= 1e-4, pixels within +-1
and every id list matches. Shapes, n, steps, sizes and guidance all come from the kit.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from modeling.emu import regress as R
from modeling.emu.load import detect_variant, load_encoder, load_tokenizer
from modeling.emu.tokens import Prompt
from modeling.emu.transforms import EvaTransform

TOL, PIXEL_TOL = 1e-4, 1


def kit_variant(kit: dict, kit_dir: Path) -> str:
    text = f"{kit.get('reference', '')} {kit.get('layout', '')}"
    named = "emu2" if "Emu2" in text else "emu1" if "Emu1" in text or "BAAI/Emu " in text else None
    found = detect_variant(kit_dir)
    if named is not None and named != found:
        raise ValueError(f"kit.json names {named} but {kit_dir} holds an {found} model folder")
    return found


class Report:
    def __init__(self):
        self.ok, self.lines = True, []

    def rel(self, name: str, got: torch.Tensor, want: torch.Tensor) -> str:
        got, want = got.detach().float().cpu(), want.float()
        if got.shape != want.shape:
            self.ok = False
            return f"{name} SHAPE {tuple(got.shape)}!={tuple(want.shape)}"
        r = float((got - want).norm() / want.norm().clamp_min(1e-12))
        self.ok &= r <= TOL
        return f"{name} {r:.1e}" + ("" if r <= TOL else " FAIL")

    def same(self, name: str, got: list, want: list) -> str:
        good = list(got) == list(want)
        self.ok &= good
        return f"{name} {'ok' if good else 'DIFFER'}"


def recorded_rows(t: dict, cid: str, group: str | None = None):
    """The LLM rows the kit recorded for a case: [(prefix, row index)] in [cond, uncond] order.
    Emu2 keeps cond/uncond apart (`<id>.cond.*`), Emu1 batches them (`<id>.llm.*` rows)."""
    if group is not None:
        return [(f"{cid}.{group}", r) for r in range(t[f"{cid}.{group}.input_ids"].shape[0])]
    if f"{cid}.cond.input_ids" in t:
        return [(f"{cid}.{role}", 0) for role in ("cond", "uncond") if f"{cid}.{role}.input_ids" in t]
    return [(f"{cid}.llm", r) for r in range(t[f"{cid}.llm.input_ids"].shape[0])]


def recorded_prompt(t: dict, prefix: str, r: int, n: int, image_id: int, n_images: int) -> Prompt:
    """The prefill the reference saw: the last forward's real ids minus its n - 1 fed-back <image>s."""
    mask = t[f"{prefix}.attention_mask"][r].bool()
    ids = t[f"{prefix}.input_ids"][r][mask].tolist()[: -(n - 1) or None]
    return Prompt(ids, [i for i, v in enumerate(ids) if v == image_id], n_images)


def compare_row(rep: Report, t: dict, prefix: str, r: int, out: R.RegressOut, k: int, emb_key: str | None) -> list[str]:
    mask = t[f"{prefix}.attention_mask"][r].bool()
    valid = out.valid[k]
    cols = [rep.rel("regressed", out.embeds[k], t[emb_key][r] if emb_key else t[f"{prefix}.regressed"][r]),
            rep.rel("step", out.embeds[k], t[f"{prefix}.step_embeds"][r]),
            rep.rel("hidden", out.hidden[k][valid], t[f"{prefix}.last_hidden"][r][mask])]
    if f"{prefix}.inputs_embeds" in t:
        cols.append(rep.rel("inputs", out.inputs[k][valid], t[f"{prefix}.inputs_embeds"][r][mask]))
    return cols


def load_images(kit_dir: Path, case: dict, tf: EvaTransform) -> torch.Tensor | None:
    names = [x["image"] for x in case.get("inputs", []) if "image" in x]
    return tf.batch([Image.open(kit_dir / n) for n in names]) if names else None


class Diffusion:
    """The diffusion side (modeling.emu.diffusion), loaded once per kit on first use: our cond /
    uncond through the kit case's sampler with its recorded noise stream replayed."""

    def __init__(self, kit_dir: Path, variant: str):
        self.kit_dir, self.variant, self.dec, self.module = kit_dir, variant, None, None

    def check(self, rep: Report, case: dict, cond, uncond) -> list[str]:
        if self.module is None:
            try:
                from modeling.emu import diffusion
            except ModuleNotFoundError as e:
                if e.name != "modeling.emu.diffusion":
                    raise
                rep.ok = False
                return ["diffusion: modeling.emu.diffusion is not there (--llm-only checks the LLM side alone) FAIL"]
            self.module = diffusion
            self.dec = diffusion.load_decoder(self.kit_dir, self.variant, "cpu", torch.float32)
        errs = self.module.decoder_case_errors(self.kit_dir, case, self.dec, cond, uncond)
        cols = []
        for name, err in errs.items():
            if name == "safety_pixel_values" and 0 < errs.get("pixels", 0) <= PIXEL_TOL:
                # the CLIP input is made from the rounded pixels: a pixel that rounds the other way
                # (allowed: ±1) moves it by ~1e-3; it is gated only when the pixels agree exactly
                cols.append(f"{name} {err:.1e} (follows the pixels)")
                continue
            good = err <= (PIXEL_TOL if name == "pixels" else TOL)
            rep.ok &= good
            cols.append((f"pixels ±{err:g}" if name == "pixels" else f"{name} {err:.1e}") + ("" if good else " FAIL"))
        return cols


@dataclass
class Row:
    prefix: str  # the kit's tensors of this row: <prefix>.input_ids etc.
    r: int  # its row in them
    prompt: Prompt
    pixels: torch.Tensor | None
    uncond: bool
    out: R.RegressOut | None = None
    k: int = 0  # our row in out


@dataclass
class CaseRun:
    case: dict
    cols: list[str]
    rows: list[Row] = field(default_factory=list)
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None


def plan_case(rep: Report, enc, tok, fast, t: dict, kit_dir: Path, case: dict, tf: EvaTransform, n: int) -> CaseRun:
    cid, run_ = case["id"], CaseRun(case, [])
    pixels = load_images(kit_dir, case, tf)
    if pixels is not None and f"{cid}.pixel_values" in t:
        run_.cols.append(rep.rel("pixels_in", pixels, t[f"{cid}.pixel_values"]))
    autoenc = enc.variant == "emu2" and "inputs" in case and R.is_autoencode([x.get("text", x) for x in case["inputs"]])
    if case["kind"] == "autoencode" or autoenc:  # Emu2, an image and no text: no LLM
        run_.cond = R.autoencode(enc, pixels)
        run_.cols.append(rep.rel("cond", run_.cond, t[f"{cid}.image_embeds"]))
        if float(case["params"]["guidance_scale"]) > 1:
            run_.uncond = R.autoencode_uncond(enc)
            run_.cols.append(rep.rel("uncond", run_.uncond, t[f"{cid}.uncond_image_embeds"]))
        return run_
    if pixels is not None:
        run_.cols += image_checks(rep, enc, t, cid, pixels)
    group = "batch" if case["kind"] == "llm_batch" else None
    texts, llm_texts = case.get("texts"), case.get("llm_texts")
    for prefix, r in recorded_rows(t, cid, group):
        uncond = group is None and (prefix.endswith(".uncond") or (r > 0 and (llm_texts is None or llm_texts[r] == "")))
        if uncond:
            parts = [""]
        elif texts:
            parts = [texts[r]]
        else:
            parts = [x["text"] if "text" in x else None for x in case["inputs"]]  # None: an image
        n_images = sum(p is None for p in parts)
        prompt = recorded_prompt(t, prefix, r, n, tok.special.image, n_images)
        tag = "_uncond" if uncond else str(r) if texts else ""
        run_.cols.append(rep.same(f"ids{tag}", tok.encode(parts).ids, prompt.ids))  # the generation layout
        if not uncond:
            want = case["prompt_ids"][r] if texts else case["prompt_ids"]
            run_.cols.append(rep.same(f"prompt_ids{tag}", tok.encode(parts, generate=False).ids, want))
            if fast is not None:
                want_fast = case.get("prompt_ids_fast")
                want_fast = want if want_fast is None else want_fast[r] if texts else want_fast
                run_.cols.append(rep.same(f"fast_ids{tag}", fast.encode(parts, generate=False).ids, want_fast))
        run_.rows.append(Row(prefix, r, prompt, None if uncond else pixels, uncond))
    return run_


def run_llm(enc, rows: list[Row], n: int) -> None:
    """One LLM batch over rows (left-padded); fills row.out / row.k."""
    x, valid = R.prompt_inputs(enc, [row.prompt for row in rows], R.image_inputs(enc, [row.pixels for row in rows]))
    out = R.regress(enc, x, valid, n, trace=True)
    for k, row in enumerate(rows):
        row.out, row.k = out, k


def run(kit_dir: str | Path, batched: bool = False, llm_only: bool = False) -> tuple[bool, list[str]]:
    kit_dir = Path(kit_dir)
    kit = json.loads((kit_dir / "kit.json").read_text())
    t = load_file(str(kit_dir / "tensors.safetensors"))
    variant = kit_variant(kit, kit_dir)
    enc, tok = load_encoder(kit_dir), load_tokenizer(kit_dir, variant)
    fast = load_tokenizer(kit_dir, variant, "fast") if (kit_dir / "tokenizer" / "tokenizer.json").is_file() else None
    n = int(kit.get("n_query", kit.get("n_causal", enc.n_embeds)))
    rep = Report()
    if n != enc.n_embeds:
        rep.ok = False
        rep.lines.append(f"kit n={n} but the model regresses {enc.n_embeds} embeddings per image  FAIL")
    for name, want in (("bos", tok.special.bos), ("[IMG]", tok.special.boi), ("[/IMG]", tok.special.eoi),
                       ("<image>", tok.special.image), ("[PAD]", tok.special.pad)):
        got = kit["special_token_ids"].get(name)
        if got is not None and int(got) != want:
            rep.ok = False
            rep.lines.append(f"special id {name}: kit {got} vs tokenizer {want}  FAIL")
    tf = EvaTransform.from_kit(kit["eva_transform"]) if "eva_transform" in kit else EvaTransform(enc.params.eva.image_size)
    diffusion = Diffusion(kit_dir, variant)
    runs = [plan_case(rep, enc, tok, fast, t, kit_dir, case, tf, n) for case in kit["cases"]]
    # the LLM stage: an llm_batch case's rows together; cond rows one by one (or all in one batch
    # with --batched); the "" row once per kit, as an actor would cache it
    cond = [row for cr in runs if cr.case["kind"] != "llm_batch" for row in cr.rows if not row.uncond]
    for rows in ([cond] if batched and cond else [[row] for row in cond]):
        run_llm(enc, rows, n)
    for cr in runs:
        if cr.case["kind"] == "llm_batch":
            run_llm(enc, cr.rows, n)
    unconds = [row for cr in runs for row in cr.rows if row.uncond]
    if unconds:
        run_llm(enc, unconds[:1], n)
        for row in unconds[1:]:
            row.out, row.k = unconds[0].out, 0
    for cr in runs:
        cid = cr.case["id"]
        for row in cr.rows:
            emb_key = None if row.prefix.endswith((".cond", ".uncond", ".batch")) else f"{cid}.regressed"
            cr.cols.append(f"[{row.prefix.rsplit('.', 1)[-1]}{'' if row.prefix.endswith('cond') else row.r}]")
            cr.cols += compare_row(rep, t, row.prefix, row.r, row.out, row.k, emb_key)
            embeds = row.out.embeds[row.k: row.k + 1]
            cr.cond, cr.uncond = (cr.cond, embeds) if row.uncond else (embeds, cr.uncond)
        if cr.case["kind"] == "llm_batch":
            cr.cols += alone_checks(rep, enc, t, cr, n)
        elif f"{cid}.prompt_embeds" in t:
            both = cr.cond if cr.uncond is None else torch.cat([cr.cond, cr.uncond])
            cr.cols.append(rep.rel("prompt_embeds", both, t[f"{cid}.prompt_embeds"]))
            if not llm_only:
                cr.cols += diffusion.check(rep, cr.case, cr.cond, cr.uncond)
        rep.lines.append(f"{cid:<12} {cr.case['kind']:<10} " + "  ".join(cr.cols))
    return rep.ok, rep.lines


def image_checks(rep: Report, enc, t: dict, cid: str, pixels: torch.Tensor) -> list[str]:
    with torch.no_grad():
        vis = enc.visual(pixels)
        cols = []
        for key in ("visual_out", "visual_features"):
            if f"{cid}.{key}" in t:
                cols.append(rep.rel(key, vis, t[f"{cid}.{key}"]))
        if f"{cid}.ln_visual" in t:
            cols.append(rep.rel("ln_visual", enc.ln_visual(vis), t[f"{cid}.ln_visual"]))
        inputs = enc.image_inputs(pixels)
        if enc.variant == "emu2":
            cols.append(rep.rel("image_embeds", enc.image_features(pixels), t[f"{cid}.image_embeds"]))
            if f"{cid}.image_embeds_up" in t:
                cols.append(rep.rel("image_embeds_up", inputs.reshape(-1, inputs.shape[-1]), t[f"{cid}.image_embeds_up"]))
        elif f"{cid}.image_embeds" in t:
            cols.append(rep.rel("image_embeds", inputs, t[f"{cid}.image_embeds"]))
    return cols


def alone_checks(rep: Report, enc, t: dict, cr: CaseRun, n: int) -> list[str]:
    """llm_batch: each row alone vs the kit's rowK.*, and our batched rows vs our rows alone."""
    cols = []
    for row in cr.rows:
        key = f"{cr.case['id']}.row{row.r}"
        if f"{key}.input_ids" not in t:
            continue
        alone = Row(key, 0, row.prompt, None, False)
        run_llm(enc, [alone], n)
        cols += [f"[row{row.r}]"] + compare_row(rep, t, key, 0, alone.out, 0, None)
        cols.append(rep.rel("batch_vs_alone", row.out.embeds[row.k], alone.out.embeds[0]))
    return cols


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kit_dir")
    ap.add_argument("--batched", action="store_true", help="run every case's cond row in one LLM batch")
    ap.add_argument("--llm-only", action="store_true", help="stop before the diffusion decoder")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    ok, lines = run(args.kit_dir, args.batched, args.llm_only)
    print("\n".join(lines))
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
