"""EVA preprocessing of prompt images, as both references do it:
Resize((s, s), BICUBIC) on the PIL image (aspect not kept), ToTensor, Normalize(OpenAI CLIP).
s is the EVA image size (Emu2 448, Emu1 224; a kit's `eva_transform.size`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EvaTransform:
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_kit(cls, spec: dict) -> EvaTransform:
        interp = str(spec.get("interpolation", "bicubic"))
        if not interp.lower().startswith("bicubic"):
            raise ValueError(f"eva_transform interpolation {interp!r}: only bicubic (PIL) is implemented")
        return cls(int(spec["size"]), tuple(spec.get("mean", CLIP_MEAN)), tuple(spec.get("std", CLIP_STD)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # PIL image -> [3, s, s] float32, normalised
        if self.size < 1:
            raise ValueError(f"EVA transform size must be >= 1, got {self.size}")
        img = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        # -> [k, 3, s, s]
        return torch.stack([self(im) for im in images]) if images else torch.zeros(0, 3, self.size, self.size)
