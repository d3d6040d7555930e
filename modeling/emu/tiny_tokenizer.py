"""Real LLaMA-style tokenizer files for the tiny Emu models, built on the fly (no downloads).

A SentencePiece BPE (byte fallback, dummy prefix, unk/bos/eos = 0/1/2, as LLaMA's) is trained
on a small built-in corpus and saved as `tokenizer.model`; for Emu2 the same vocabulary is
written as a `tokenizer.json` (legacy LlamaTokenizerFast pipeline: Prepend("▁") + Replace(" ", "▁"),
BPE with merges derived from the vocabulary, byte fallback) with the release's added tokens.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """a red cube on a table. a photo of a cat sitting on a sofa. an image of a dog wearing a pair of glasses.
impressionist painting of an astronaut in a jungle. a small red boat on a river at sunset. green tree.
this is the first image: the animal in the first image on a beach. wearing a red hat on the beach.
a watercolor painting of a mountain lake at sunrise, digital art, high quality. the quick brown fox
jumps over the lazy dog. an astronaut riding a horse on the moon. a bowl of fruit, apples and pears.
"""
VOCAB = 384  # 3 control + 256 bytes + 125 merges, like the kits'

# Emu2-Gen's added tokens, in the release's order: [PAD] [IMG] [/IMG] <image> ... <patch_index_0256>
EMU2_ADDED = (["[PAD]", "[IMG]", "[/IMG]", "<image>", "[gIMG]", "[/gIMG]", "[EOC]", "[VIDEO]", "<grounding>",
               "<phrase>", "</phrase>", "<object>", "</object>", "</delimiter_of_multi_objects/>", "<REC>"]
              + [f"<patch_index_{i:04d}>" for i in range(257)])


def _added_token(content: str, normalized: bool = True) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized,
            "rstrip": False, "single_word": False}


def train_sentencepiece() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.replace(". ", ".\n").splitlines() * 8), model_writer=out,
        model_type="bpe", vocab_size=VOCAB, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2,
    )
    return out.getvalue()


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    # every split of a piece into two pieces, pieces in vocabulary order (as HF's converter does)
    merges = []
    for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return merges


def fast_tokenizer_json(model: bytes, added: list[str]) -> str:
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = Tokenizer(BPE(vocab=vocab, merges=_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken("<unk>", normalized=True), AddedToken("<s>", normalized=False),
                            AddedToken("</s>", normalized=False)])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in added])
    return tok.to_str(pretty=True)


def _tokenizer_config(legacy: bool) -> dict:
    cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
           "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>"),
           "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
           "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token("<unk>")}
    if legacy:
        cfg["legacy"] = True
    return cfg


def write_emu2_tokenizer(out: Path, model: bytes | None = None) -> int:
    """tokenizer/ as released (tokenizer.model, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, added_tokens.json) around the SentencePiece `model` (default: one
    trained on the built-in corpus; LLaMA's own 32,000-piece model gives the release's ids);
    returns the full vocabulary size."""
    out.mkdir(parents=True, exist_ok=True)
    model = model or train_sentencepiece()
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer.json").write_text(fast_tokenizer_json(model, EMU2_ADDED))
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    added = {t: base + i for i, t in enumerate(EMU2_ADDED)}
    (out / "added_tokens.json").write_text(json.dumps(dict(sorted(added.items())), indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(legacy=True), indent=2))
    special = {"additional_special_tokens": EMU2_ADDED[1:], "bos_token": "<s>", "eos_token": "</s>",
               "pad_token": "[PAD]", "unk_token": {k: v for k, v in _added_token("<unk>").items() if k != "__type"}}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return base + len(EMU2_ADDED)


def write_emu1_tokenizer(out: Path) -> int:
    """llama_config/ tokenizer files (the reference adds [PAD] [IMG] [/IMG] <image> itself);
    returns the SentencePiece vocabulary size."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece()
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(legacy=False), indent=2))
    special = {k: {kk: vv for kk, vv in _added_token(v).items() if kk != "__type"}
               for k, v in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()
