"""CLIP score of an image and its prompt, as torchmetrics' CLIPScore defines it:
max(100 * cos(E_image, E_text), 0), with the embeddings of a transformers `CLIPModel`
(projected `pooler_output`s) and the inputs made by the checkpoint's own `CLIPProcessor`
(image processor: resize, centre crop, normalise; tokenizer).

One deliberate difference: a prompt longer than the text model's positions is cut by the
tokenizer, which keeps the end-of-text token the CLIP text model pools at; torchmetrics
slices the ids instead and so loses it. Prompts that fit score the same.

No Ray and no IO besides loading: `ClipScorer.load(directory)` reads safetensors only
(no pickles, no remote code). `write_tiny_clip` makes a tiny random one for demos and tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_DIM = 32
TINY_IMAGE = 32


class ClipScorer:
    def __init__(self, model, processor, device: str = "cpu"):
        self.model, self.processor, self.device = model, processor, torch.device(device)
        self.max_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, directory: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ClipScorer:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(directory, dtype=dtype, use_safetensors=True, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(directory, local_files_only=True)
        return cls(model.to(device).eval().requires_grad_(False), processor, device)

    @torch.inference_mode()
    def image_embeds(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] pixels -> l2-normalised float32 [B, D]. PIL images in, so that the
        processor never has to guess the channel axis of a small image."""
        pixels = self.processor.image_processor(images=[Image.fromarray(np.asarray(i, np.uint8)) for i in images],
                                                return_tensors="pt")["pixel_values"]
        out = self.model.vision_model(pixel_values=pixels.to(self.device, self.model.dtype))
        return _normalise(self.model.visual_projection(out.pooler_output))

    @torch.inference_mode()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return _normalise(self.model.text_projection(out.pooler_output))

    def score(self, images: list[np.ndarray], texts: list[str]) -> np.ndarray:
        """One float32 score per (image, text) pair."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        if not images:
            return np.zeros(0, np.float32)
        cos = (self.image_embeds(images) * self.text_embeds(texts)).sum(dim=-1)
        return (100 * cos).clamp(min=0).cpu().numpy().astype(np.float32)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(p=2, dim=-1, keepdim=True)


def write_tiny_clip(directory: str | Path, seed: int = 0) -> str:
    """A tiny random-weight CLIP in the hub layout (config.json, model.safetensors,
    preprocessor_config.json, a real CLIP BPE tokenizer); returns the directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    # the tiny CLIP BPE the tiny DALLE2 stack trains offline: real CLIPTokenizer files, no download
    from modeling.dalle2.tiny import write_tokenizer

    out = Path(directory)
    write_tokenizer(out)
    tok = CLIPTokenizer.from_pretrained(str(out))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=TINY_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=TINY_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TINY_IMAGE, patch_size=8),
        projection_dim=TINY_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    with torch.no_grad():
        # A common final-norm bias and one projection for both towers give random embeddings a
        # shared direction: scores spread over about 10 to 50, as a real CLIP's do, instead of
        # half of them clamped to 0.
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(str(out), safe_serialization=True)
    # preprocessor_config.json, the hub's name for it (a CLIPProcessor would save processor_config.json)
    CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}).save_pretrained(str(out))
    return str(out)
