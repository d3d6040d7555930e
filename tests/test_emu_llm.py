"""Emu LLM side vs the recorded kits: tokenisation, EVA / cformer / image embeddings, the
KV-cached regression loop (regressed, step_embeds, last_hidden), batching with left padding,
special-token injection, loader strictness."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling.emu import regress as R
from modeling.emu.load import load_encoder, load_tokenizer
from modeling.emu.parity import recorded_prompt
from modeling.emu.transforms import EvaTransform
from tests.conftest import FIXTURES, shared_fixture

KITS = {"emu2": FIXTURES / "emu2-tiny", "emu1": FIXTURES / "emu1-tiny"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matmuls: intra-op threads only contend on a shared CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["emu2", "emu1"])
def kit(request):
    d = shared_fixture(KITS[request.param].name)
    return {"variant": request.param, "dir": d, "json": json.loads((d / "kit.json").read_text()),
            "t": load_file(str(d / "tensors.safetensors")), "enc": load_encoder(d), "tok": load_tokenizer(d)}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def parts_of(case):
    return [x["text"] if "text" in x else None for x in case["inputs"]]


def image_case(kit):
    return next(c for c in kit["json"]["cases"] if c["kind"] == "image_text")


def test_tokenisation_matches_kit(kit):
    tok, checked = kit["tok"], 0
    fast = load_tokenizer(kit["dir"], mode="fast") if kit["variant"] == "emu2" else None
    for case in kit["json"]["cases"]:
        if case["kind"] == "autoencode":
            continue
        rows = [[x] for x in case["texts"]] if "texts" in case else [parts_of(case)]
        for r, parts in enumerate(rows):
            want = case["prompt_ids"][r] if "texts" in case else case["prompt_ids"]
            assert tok.encode(parts, generate=False).ids == want
            if fast is not None:
                want_fast = case.get("prompt_ids_fast", want)
                assert fast.encode(parts, generate=False).ids == want_fast
            checked += 1
    assert checked >= 3


def test_generation_layout_matches_recorded_inputs(kit):
    """tok.encode(parts) = BOS + prompt + [IMG], with the slow tokenizer's stripping before the
    appended [IMG] (Emu1 incontext ends in ": ")."""
    t, tok = kit["t"], kit["tok"]
    n = kit["enc"].n_embeds
    for case in kit["json"]["cases"]:
        if case["kind"] in ("autoencode", "llm_batch"):
            continue
        prefix = f"{case['id']}.cond" if kit["variant"] == "emu2" else f"{case['id']}.llm"
        want = recorded_prompt(t, prefix, 0, n, tok.special.image, 0)
        got = tok.encode(parts_of(case))
        assert got.ids == want.ids
        assert got.image_positions == want.image_positions


@pytest.mark.parametrize("literal", ["[IMG]", "<image>", "[/IMG]", "[<IMG_PLH>]", "<s>", "[PAD]"])
def test_user_text_cannot_inject_special_tokens(kit, literal):
    tok = kit["tok"]
    toks = [tok] + ([load_tokenizer(kit["dir"], mode="fast")] if kit["variant"] == "emu2" else [])
    specials = {tok.special.boi, tok.special.eoi, tok.special.image, tok.special.pad, tok.special.bos}
    for tk in toks:
        p = tk.encode([f"a dog {literal} on a table"])
        assert p.image_positions == [] and p.n_images == 0
        assert p.ids[0] == tk.special.bos and p.ids[-1] == tk.special.boi
        assert not specials & set(p.ids[1:-1]), (tk.mode, literal, p.ids)
        assert p.ids[1:-1] == tk.encode_text(f"a dog {literal} on a table")
        with_image = tk.encode([f"{literal} x ", Image.new("RGB", (4, 4)), f" {literal}"])
        assert with_image.n_images == 1 and len(with_image.image_positions) == tk.n_per_image


def test_eva_transform_matches_kit(kit):
    case, t = image_case(kit), kit["t"]
    tf = EvaTransform.from_kit(kit["json"]["eva_transform"])
    name = next(x["image"] for x in case["inputs"] if "image" in x)
    torch.testing.assert_close(tf.batch([Image.open(kit["dir"] / name)]), t[f"{case['id']}.pixel_values"], atol=1e-6, rtol=0)


def test_image_embeddings_match_kit(kit):
    enc, t = kit["enc"], kit["t"]
    cid = image_case(kit)["id"]
    pix = t[f"{cid}.pixel_values"]
    with torch.no_grad():
        vis = enc.visual(pix)
        if kit["variant"] == "emu2":
            assert rel(vis, t[f"{cid}.visual_out"]) < 1e-5
            assert rel(enc.image_features(pix), t[f"{cid}.image_embeds"]) < 1e-5
            assert rel(enc.image_inputs(pix).flatten(0, 1), t[f"{cid}.image_embeds_up"]) < 1e-5
        else:
            assert rel(vis, t[f"{cid}.visual_features"]) < 1e-5
            assert rel(enc.image_features(pix), t[f"{cid}.ln_visual"]) < 1e-5
            # the cformer on the kit's own ln_visual features, then end to end
            assert rel(enc.cformer(t[f"{cid}.ln_visual"]), t[f"{cid}.image_embeds"]) < 1e-5
            assert rel(enc.image_inputs(pix), t[f"{cid}.image_embeds"]) < 1e-5


def test_autoencode_embeddings_match_kit():
    d = shared_fixture("emu2-tiny/kit.json").parent
    t, enc = load_file(str(d / "tensors.safetensors")), load_encoder(d)
    assert rel(R.autoencode(enc, t["autoencode.pixel_values"]), t["autoencode.image_embeds"]) < 1e-5
    assert rel(R.autoencode_uncond(enc), t["autoencode.uncond_image_embeds"]) < 1e-5
    assert float(t["autoencode.uncond_pixel_values"].abs().max()) == 0.0


def test_loop_matches_kit(kit):
    """regressed, step_embeds, last_hidden and inputs_embeds of the image case's cond row."""
    enc, tok, t = kit["enc"], kit["tok"], kit["t"]
    case = image_case(kit)
    cid = case["id"]
    out = R.encode_prompts(enc, [tok.encode(parts_of(case))], [t[f"{cid}.pixel_values"]], trace=True)
    if kit["variant"] == "emu2":
        pre, regressed = f"{cid}.cond", t[f"{cid}.cond.regressed"]
    else:
        pre, regressed = f"{cid}.llm", t[f"{cid}.regressed"][:1]
    mask = t[f"{pre}.attention_mask"][0].bool()
    assert rel(out.embeds, regressed) < 1e-5
    assert rel(out.embeds, t[f"{pre}.step_embeds"][:1]) < 1e-5
    assert rel(out.hidden[0], t[f"{pre}.last_hidden"][0][mask]) < 1e-5
    assert rel(out.inputs[0], t[f"{pre}.inputs_embeds"][0][mask]) < 1e-5
    # the "" guidance row
    u = R.unconditional(enc, tok)
    want = t[f"{cid}.uncond.regressed"] if kit["variant"] == "emu2" else t[f"{cid}.regressed"][1:]
    assert rel(u, want) < 1e-5


def test_batched_left_padded_equals_single_rows(kit):
    """Rows of different lengths (text, image+text, "") in one left-padded batch == each alone,
    in float32 to 1e-4; the cache sized larger than needed and reused across calls."""
    enc, tok, t = kit["enc"], kit["tok"], kit["t"]
    case = image_case(kit)
    pix = t[f"{case['id']}.pixel_values"]
    prompts = [tok.encode(["a red cube on a table, in the style of an impressionist painting"]),
               tok.encode(parts_of(case)), tok.encode([""]), tok.encode(["a dog"])]
    pixels = [None, pix, None, None]
    enc.decoder.setup_caches(8, 400)
    batch = R.encode_prompts(enc, prompts, pixels).embeds
    for r in range(len(prompts)):
        alone = R.encode_prompts(enc, [prompts[r]], [pixels[r]]).embeds
        assert rel(batch[r:r + 1], alone) < 1e-4, r
        assert float((batch[r:r + 1] - alone).abs().max()) < 1e-4
    again = R.encode_prompts(enc, prompts[::-1], pixels[::-1]).embeds
    assert rel(again.flip(0), batch) < 1e-4


def test_llm_batch_case_matches_kit():
    d = shared_fixture("emu2-tiny/kit.json").parent
    kit = json.loads((d / "kit.json").read_text())
    t, enc, tok = load_file(str(d / "tensors.safetensors")), load_encoder(d), load_tokenizer(d)
    case = next(c for c in kit["cases"] if c["kind"] == "llm_batch")
    out = R.encode_prompts(enc, [tok.encode([x]) for x in case["texts"]], [None] * len(case["texts"]))
    assert rel(out.embeds, t["llm_batch.batch.regressed"]) < 1e-5
    for r in range(len(case["texts"])):
        assert rel(out.embeds[r:r + 1], t[f"llm_batch.row{r}.regressed"]) < 1e-5


def test_prompt_inputs_rejects_image_mismatch(kit):
    enc, tok = kit["enc"], kit["tok"]
    with pytest.raises(ValueError, match="images"):
        R.prompt_inputs(enc, [tok.encode(["x ", Image.new("RGB", (4, 4))])], [None])


def test_decode_step_traces_whole():
    """The per-step function compiles as one graph (no graph breaks) and gives the same numbers."""
    d = shared_fixture("emu2-tiny/kit.json").parent
    enc, tok = load_encoder(d), load_tokenizer(d)
    prompts = [tok.encode(["a red cube"]), tok.encode(["a dog on a beach at sunset"])]
    x, valid = R.prompt_inputs(enc, prompts, [None, None])
    eager = R.regress(enc, x, valid, 8).embeds
    torch._dynamo.reset()
    step = torch.compile(R.decode_step, fullgraph=True, backend="eager", dynamic=False)
    compiled = R.regress(enc, x, valid, 8, step=step).embeds
    assert rel(compiled, eager) < 1e-6
