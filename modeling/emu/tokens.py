"""Emu prompts -> token ids: text parts and images, laid out as the references do.

    BOS + text + [IMG] <image> x n [/IMG] (per prompt image) + ... (+ [IMG] when generating)

Special tokens are placed structurally, never parsed out of user text: a prompt that contains
the literal string "[IMG]", "<image>" or "[<IMG_PLH>]" tokenises as plain text (both paths
encode text with no added-token matching at all).

Two ways to encode the text between special tokens:
  slow  the references' LlamaTokenizer (legacy, SentencePiece `tokenizer.model`): whitespace
        touching a special token is dropped (`"image: [IMG]"` -> "image:"), each text run is
        encoded on its own with SentencePiece's dummy prefix. Every kit tensor follows it.
  fast  the released Emu2-Gen `tokenizer/tokenizer.json` (LlamaTokenizerFast): no stripping,
        each text run goes through the tokenizer's normaliser on its own (so a space after a
        special token becomes an extra "▁").
Special ids: Emu2 from the tokenizer files (added_tokens.json / tokenizer.json); Emu1 appends
[PAD] [IMG] [/IMG] <image> after the SentencePiece vocabulary, as its reference does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modeling.emu.config import EMU1_ADDED_TOKENS

SPECIAL_NAMES = {"pad": "[PAD]", "boi": "[IMG]", "eoi": "[/IMG]", "image": "<image>"}


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    pad: int
    boi: int  # [IMG]
    eoi: int  # [/IMG]
    image: int  # <image>


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    image_positions: list[int]  # <image> slots that take the prompt images' embeddings, n per image, in order
    n_images: int


def layout(parts: Sequence[object]) -> tuple[list[str | None], int]:
    """Merge adjacent text parts; any non-str part is an image slot (None). Returns (runs, n_images)."""
    runs: list[str | None] = []
    for part in parts:
        if isinstance(part, str):
            if runs and isinstance(runs[-1], str):
                runs[-1] += part
            else:
                runs.append(part)
        else:
            runs.append(None)
    return runs, sum(r is None for r in runs)


class EmuTokenizer:
    def __init__(self, encode_text, special: SpecialIds, n_per_image: int, strip_at_specials: bool, mode: str):
        self._encode_text = encode_text  # str -> list[int], no special-token parsing
        self.special = special
        self.n_per_image = n_per_image
        self.strip_at_specials = strip_at_specials
        self.mode = mode

    def encode_text(self, text: str) -> list[int]:
        return list(self._encode_text(text)) if text else []

    def encode(self, parts: Sequence[object], *, generate: bool = True) -> Prompt:
        """parts: str (text) or anything else (an image, in order). generate=True appends the
        [IMG] that opens the image to regress (what the LLM's prefill sees)."""
        if isinstance(parts, str):
            parts = [parts]
        runs, n_images = layout(parts)
        s = self.special
        items: list[str | None] = runs + ([None] if generate else [])  # None: a special-token block
        ids, positions = [s.bos], []
        for i, item in enumerate(items):
            if item is None:
                ids.append(s.boi)
                if not (generate and i == len(items) - 1):  # the last [IMG] opens the image to regress
                    positions.extend(range(len(ids), len(ids) + self.n_per_image))
                    ids.extend([s.image] * self.n_per_image + [s.eoi])
                continue
            text = item
            if self.strip_at_specials:  # legacy slow tokenizer: drop whitespace touching a special token
                if i > 0:
                    text = text.lstrip()
                if i + 1 < len(items):
                    text = text.rstrip()
            ids.extend(self.encode_text(text))
        return Prompt(ids=ids, image_positions=positions, n_images=n_images)


def _sentencepiece(path: Path):
    import sentencepiece as spm

    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return sp, (lambda text: sp.encode(text))


def _plain_fast(path: Path):
    """The tokenizer.json pipeline without any added tokens (so none can be matched in text)
    and without its post-processor (BOS is placed by `encode`)."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    spec = json.loads(path.read_text())
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    spec["added_tokens"], spec["post_processor"] = [], None
    tok = Tokenizer.from_str(json.dumps(spec))
    return added, (lambda text: tok.encode(text, add_special_tokens=False).ids)


def _special(ids: dict[str, int], bos: int, where: Path) -> SpecialIds:
    missing = [tok for tok in SPECIAL_NAMES.values() if tok not in ids]
    if missing:
        raise ValueError(f"{where}: no id for {missing}")
    return SpecialIds(bos=bos, **{k: int(ids[v]) for k, v in SPECIAL_NAMES.items()})


def emu2_tokenizer(tokenizer_dir: str | Path, n_query: int, mode: str = "slow") -> EmuTokenizer:
    """Emu2-Gen's `tokenizer/`: slow = tokenizer.model + added_tokens.json, fast = tokenizer.json."""
    d = Path(tokenizer_dir)
    if mode == "slow":
        sp, enc = _sentencepiece(d / "tokenizer.model")
        added_file = d / "added_tokens.json"
        if not added_file.is_file():
            raise FileNotFoundError(f"missing added_tokens.json in {d}")
        added = {k: int(v) for k, v in json.loads(added_file.read_text()).items()}
        return EmuTokenizer(enc, _special(added, sp.bos_id(), added_file), n_query, True, mode)
    if mode == "fast":
        added, enc = _plain_fast(d / "tokenizer.json")
        if "<s>" not in added:
            raise ValueError(f"{d / 'tokenizer.json'}: no <s> token")
        return EmuTokenizer(enc, _special(added, added["<s>"], d / "tokenizer.json"), n_query, False, mode)
    raise ValueError(f"tokenizer mode must be 'slow' or 'fast', got {mode!r}")


def emu1_tokenizer(llama_config_dir: str | Path, n_causal: int) -> EmuTokenizer:
    """Emu1's `llama_config/tokenizer.model` (slow, as its reference) + [PAD] [IMG] [/IMG] <image>."""
    d = Path(llama_config_dir)
    sp, enc = _sentencepiece(d / "tokenizer.model")
    added = {tok: sp.get_piece_size() + i for i, tok in enumerate(EMU1_ADDED_TOKENS)}
    return EmuTokenizer(enc, _special(added, sp.bos_id(), d / "tokenizer.model"), n_causal, True, "slow")
