"""CPU step after the model stages: pixels -> PNG/WebP/JPEG bytes.

Runs in plain CPU tasks so that encoding never holds a GPU actor.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.rows import has_pixels, map_samples
from pipeline.sample import Sample

_PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def encode_image(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"pixels must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    # PNG: fixed compression settings so that the same pixels give the same bytes
    kwargs = {"compress_level": 6} if fmt == "png" else {"quality": quality}
    Image.fromarray(arr).save(buf, format=_PIL_FORMAT[fmt], **kwargs)
    return buf.getvalue()


def encode_block(block: pa.Table, *, image_format: str, quality: int) -> pa.Table:
    if not has_pixels(block):  # embeddings or texts only: nothing to encode
        return block

    def encode(samples: list[Sample]) -> None:
        for s in samples:
            out = s.outputs
            if s.failure is not None or out.pixels is None:
                continue
            try:
                out.image = encode_image(out.pixels, image_format, quality)
                out.image_size = (int(out.pixels.shape[1]), int(out.pixels.shape[0]))
                out.pixels = None
            except Exception as e:  # noqa: BLE001 - a bad output is this sample's error
                s.fail("encode", type(e).__name__, str(e))

    return map_samples(block, encode)
