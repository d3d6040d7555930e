"""Tiny writer -> loader -> family stages round trip (t2i, edit, understand)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from modeling.bagel.load import load_bagel, load_tokenizer
from modeling.bagel.tiny import write_tiny
from pipeline.families.bagel import FAMILY
from pipeline.family import RowError, StageContext
from pipeline.rows import from_block, to_block
from pipeline.stages import StageGroup

OPTIONS = {"vae_transform": [64, 32, 16], "vit_transform": [56, 28, 14], "emit_latents": True, "vae_dtype": "float32"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("bagel") / "tiny", seed=1)


def _png(size=(90, 60), mode="RGBA"):
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _row(i, task, params=None, **kw):
    row = dict(id=f"r{i}", sample_index=0, task=task, prompt="a red cube on a table", negative_prompt=None, seed=0,
               sample_seed=1000 + i, width=None, height=None, image=None, mask=None,
               params=FAMILY.params_for(task, params or {}))
    row.update(kw)
    return row


def _run(stages, ctx, rows):
    for spec in stages:
        outs = spec.build(ctx)(rows)
        assert len(outs) == len(rows)
        rows = [{**r, **o} for r, o in zip(rows, outs)]
    return rows


def test_tokenizer_is_real_qwen2(ckpt):
    tok, special = load_tokenizer(ckpt)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert (special.bos_token_id, special.eos_token_id, special.start_of_image, special.end_of_image) == (1, 2, 3, 4)
    ids = tok.encode("a red cube, über alles")
    assert tok.decode(ids) == "a red cube, über alles"
    assert max(ids) < load_bagel(ckpt).params.vocab_size


def test_round_trip_all_tasks(ckpt):
    ctx = StageContext(str(ckpt), "cpu", "float32", OPTIONS)
    img = _png()
    rows = [
        _row(0, "t2i", {"num_timesteps": 3}, width=48, height=32),
        _row(1, "edit", {"num_timesteps": 3}, image=img, prompt="make it blue"),
        _row(2, "understand", {"max_think_token_n": 5}, image=img, prompt="what is it?"),
        _row(3, "t2i", {"num_timesteps": 4, "cfg_renorm_type": "channel", "image_shapes": [16, 32]}),
    ]
    out = _run(FAMILY.stages(), ctx, rows)
    assert out[0]["pixels"].shape == (32, 48, 3) and out[0]["pixels"].dtype == np.uint8
    assert out[1]["pixels"].shape == (48, 64, 3)  # 90x60 -> long side 64, multiples of 16
    assert isinstance(out[2]["text"], str) and "pixels" not in out[2]
    assert out[3]["pixels"].shape == (16, 32, 3)
    assert out[0]["embeddings"]["bagel_latent"].shape == (16, 32 // 8, 48 // 8)  # the AE's latent, decodable as is
    assert all(r.get("bagel_vae_pixels") is None and r.get("bagel_latent") is None for r in out)

    # all stages co-located on one actor (the runner's StageGroup) give the same outputs
    group = StageGroup("bagel", [(spec.name, ctx) for spec in FAMILY.stages()])
    comb = from_block(group(to_block([dict(r) for r in rows])))
    for a, b in zip(out, comb):
        assert a.get("text") == b.get("text") and "error" not in b
        if "pixels" in a:
            np.testing.assert_array_equal(a["pixels"], b["pixels"])

    # a sample's output does not depend on the batch it ran in
    alone = _run(FAMILY.stages(), ctx, [rows[1]])[0]
    np.testing.assert_allclose(alone["embeddings"]["bagel_latent"], out[1]["embeddings"]["bagel_latent"], rtol=0, atol=1e-4)


def test_params_and_row_validation(ckpt):
    assert FAMILY.params_for("t2i", {})["cfg_interval"] == [0.4, 1.0]
    assert FAMILY.params_for("edit", {})["cfg_renorm_type"] == "text_channel"
    for task, bad in [("t2i", {"nope": 1}), ("t2i", {"num_timesteps": 1}), ("edit", {"cfg_renorm_type": "x"}),
                      ("t2i", {"cfg_interval": [0.9, 0.1]}), ("understand", {"do_sample": "yes"}),
                      ("t2i", {"image_shapes": [100, 64]}), ("variation", {})]:
        with pytest.raises(RowError) as e:
            FAMILY.params_for(task, bad)
        assert e.value.kind == "bad_params"
    prep = FAMILY.stages()[0].build(StageContext(str(ckpt), "cpu", "float32", OPTIONS))
    with pytest.raises(RowError, match="multiple of 16"):
        prep([_row(0, "t2i", width=40, height=32)])
    with pytest.raises(RowError):
        prep([_row(0, "edit", image=None)])
    assert FAMILY.model_fingerprint(str(ckpt)) == FAMILY.model_fingerprint(str(ckpt))


def test_loader_is_strict(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    sd = load_file(str(bad / "ema.safetensors"))
    del sd["llm2vae.bias"]
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(bad / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['llm2vae.bias'\].*unexpected \['extra.weight'\]"):
        load_bagel(bad)


def test_quantize_needs_cuda_and_bitsandbytes(ckpt):
    lmm = {s.name: s for s in FAMILY.stages()}["lmm"]
    for mode, match in [("nf4", "needs a CUDA device"), ("int8", "needs a CUDA device"), ("int4", "must be one of")]:
        with pytest.raises(ValueError, match=match):
            lmm.build(StageContext(str(ckpt), "cpu", "float32", {"quantize": mode}))
    from modeling.bagel.quant import check_quantize

    check_quantize(None, "cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs bitsandbytes"):
            check_quantize("nf4", "cuda")
    with pytest.raises(ValueError, match="attention"):
        lmm.build(StageContext(str(ckpt), "cpu", "float32", {"attention": "sparse"}))


def test_think_mode(ckpt):
    """think=true: understand reasons after the reference's system prompt; t2i and edit write a
    plan first, which joins the conditional context of the image (and only that one)."""
    from modeling.bagel import sampling as S

    lat, vit = torch.zeros(16, 4, 4), torch.zeros(4, 588)
    row = S.ImageRow([7, 8], 32, 32, torch.zeros(4, 64), vae_latent=lat, vit_patches=vit, vit_grid=(2, 2),
                     system_ids=[5], plan_ids=[9])
    assert S.image_contexts(row) == {  # the reference's gen / cfg_text / cfg_img contexts
        "gen": [("text", [5]), ("vae", lat), ("vit", vit, (2, 2)), ("text", [7, 8]), ("text", [9])],
        "text": [("text", [5]), ("vae", lat), ("vit", vit, (2, 2))],
        "img": [("text", [5]), ("text", [7, 8])]}

    ctx = StageContext(str(ckpt), "cpu", "float32", OPTIONS)
    think = {"think": True, "max_think_token_n": 6}
    img = _png()
    rows = [
        _row(0, "t2i", {"num_timesteps": 3, **think}, width=32, height=32),
        _row(1, "t2i", {"num_timesteps": 3}, width=32, height=32),
        _row(2, "edit", {"num_timesteps": 3, **think}, image=img, prompt="make it blue"),
        _row(3, "understand", think, image=img, prompt="what is it?"),
        _row(4, "understand", {"max_think_token_n": 6}, image=img, prompt="what is it?"),
    ]
    out = _run(FAMILY.stages(), ctx, rows)
    assert isinstance(out[0]["text"], str) and out[0]["pixels"].shape == (32, 32, 3)  # a plan and an image
    assert "text" not in out[1] or out[1]["text"] is None
    assert isinstance(out[2]["text"], str) and out[2]["pixels"].shape == (48, 64, 3)
    assert out[3]["text"] != out[4]["text"]  # the system prompt changes what the model says

    # the plan is part of the image's context: the same row without thinking gives another image
    plain = _run(FAMILY.stages(), ctx, [_row(0, "t2i", {"num_timesteps": 3}, width=32, height=32)])[0]
    assert not np.allclose(plain["embeddings"]["bagel_latent"], out[0]["embeddings"]["bagel_latent"], atol=1e-4)
    # and each thinking row alone gives what it gave in the mixed batch
    for i in (0, 2, 3):
        alone = _run(FAMILY.stages(), ctx, [rows[i]])[0]
        assert alone["text"] == out[i]["text"]
        if i != 3:
            np.testing.assert_allclose(alone["embeddings"]["bagel_latent"], out[i]["embeddings"]["bagel_latent"],
                                       rtol=0, atol=1e-4)


def test_text_ends_at_a_second_im_start(ckpt):
    """As the reference, which keeps what precedes a second <|im_start|> in the decoded text."""
    from pipeline.families.bagel import decode_text

    tok, special = load_tokenizer(ckpt)
    ids = tok.encode("the cube")
    assert decode_text(tok, special, ids) == "the cube"
    assert decode_text(tok, special, [*ids, special.bos_token_id, *tok.encode(" is red")]) == "the cube"
