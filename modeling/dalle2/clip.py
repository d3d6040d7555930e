"""CLIP text/image encoding through transformers' CLIPModel (OpenAI ViT-L/14 layout).

text_embed: l2-normalised projected EOT state; text_encodings: final-layer token states
(after the final LayerNorm), zeroed past the first EOT; 77 tokens, EOT kept on truncation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .layers import l2norm

OPENAI_MODELS = {
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEncoder(nn.Module):
    def __init__(self, model, tokenizer, context_length: int = 77):
        super().__init__()
        self.model, self.tokenizer, self.context_length = model, tokenizer, context_length
        self.image_size = model.config.vision_config.image_size
        self.eot_id = tokenizer.eos_token_id
        # OpenAI pads with id 0 ("!"); the reference adapter masks id 0 as padding, so do the same there
        self.mask_zero = tokenizer.convert_ids_to_tokens(0) == "!"

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    def tokenize(self, texts: list[str]) -> Tensor:
        # split_special_tokens: a prompt that spells "<|endoftext|>" stays text and cannot end itself early
        out = self.tokenizer(list(texts), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt", split_special_tokens=True)
        return out["input_ids"]  # [B, 77]; truncation keeps the EOT token

    @torch.no_grad()
    def embed_text(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        # ids: [B, 77] -> text_embed [B, D], text_encodings [B, 77, W] (zero past the first EOT)
        ids = ids.to(self.model.device)
        out = self.model.text_model(input_ids=ids)
        embed = l2norm(self.model.text_projection(out.pooler_output).float())
        before_eot = (ids == self.eot_id).cumsum(dim=-1) == 0
        mask = torch.nn.functional.pad(before_eot, (1, -1), value=True)  # include the EOT itself
        if self.mask_zero:
            mask = mask & (ids != 0)
        enc = out.last_hidden_state.float().masked_fill(~mask[..., None], 0.0)
        return embed, enc

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        # shortest side -> image_size (bicubic), centre crop, CLIP normalisation -> [B, 3, S, S]
        s = self.image_size
        out = []
        for im in images:
            im = im.convert("RGB")
            w, h = im.size
            r = s / min(w, h)
            im = im.resize((max(s, round(w * r)), max(s, round(h * r))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
        return torch.stack(out)

    @torch.no_grad()
    def embed_image(self, pixels: Tensor) -> Tensor:
        # pixels: [B, 3, S, S] normalised -> [B, D] l2-normalised
        pixels = pixels.to(self.model.device, self.model.dtype)
        out = self.model.vision_model(pixel_values=pixels)
        return l2norm(self.model.visual_projection(out.pooler_output).float())


def load_clip(name_or_path: str, *, dtype=torch.float32, device="cpu") -> ClipEncoder:
    """`name_or_path`: an OpenAI name (ViT-L/14, ...), a Hugging Face id or a local transformers directory."""
    from transformers import CLIPModel, CLIPTokenizer

    src = OPENAI_MODELS.get(name_or_path, name_or_path)
    if Path(src).exists():
        src = str(Path(src))
    model = CLIPModel.from_pretrained(src, dtype=dtype).to(device).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(src)
    return ClipEncoder(model, tok, context_length=model.config.text_config.max_position_embeddings)
