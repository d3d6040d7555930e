"""Synthetic input images for the families' demo manifests (no downloads)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PROMPTS = ["a red cube on a table", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen, top view",
           "a watercolor fox", "a city street in the rain"]


def demo_png(seed: int, size: int = 64, mask: bool = False) -> bytes:
    """A gradient-and-noise RGB picture, or (mask=True) a white square on black."""
    rng = np.random.default_rng(seed)
    if mask:
        arr = np.zeros((size, size), np.uint8)
        arr[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
        img = Image.fromarray(arr, "L")
    else:
        y, x = np.mgrid[0:size, 0:size]
        img = Image.fromarray(np.stack([x * 4 % 256, y * 4 % 256, rng.integers(0, 256, (size, size))], -1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
