"""Input images: fetched by the runner (bytes or a URL/path), decoded by the family.

Fetching is I/O and runs in its own CPU step before the family's stages: a missing
input is the row's permanent error; a store that fails transiently is retried here
and, if it still fails, recorded as retryable so that a later run tries again.
Decoding is the family's (it knows the mode it needs) through `decode_image`.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.retry import is_transient, with_retries
from pipeline.rows import from_block, to_block
from pipeline.sample import RowError
from pipeline.storage import filesystem, redact

MAX_INPUT_BYTES = 64 * 1024 * 1024
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # decoded size; a larger header is a decompression bomb


def fetch(value: bytes | str | None) -> bytes:
    """The raw bytes of an input given inline or as a URL / path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise RowError("missing_input", "input image is empty")
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise RowError("missing_input", "input image is empty")
    where = redact(value)

    def read() -> bytes:
        fs, path = filesystem(value)
        size = fs.size(path)
        if size is not None and size > MAX_INPUT_BYTES:
            raise RowError("input_too_large", f"input {where} is {size} bytes (limit {MAX_INPUT_BYTES})")
        return fs.cat_file(path)

    try:
        return with_retries(read, what=f"fetch {where}")
    except RowError:
        raise
    except Exception as e:  # noqa: BLE001 - classified: transient ones are retried by a later run
        cause = e.__cause__ or e
        message = f"cannot read {where}: {type(cause).__name__}: {redact(str(cause))}"
        if is_transient(e):
            raise RowError("input_unavailable", message, retryable=True) from None
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise RowError("missing_input", f"input {where} does not exist") from None
        raise RowError("missing_input", message) from None


def decode_image(data: bytes | None, mode: str = "RGB") -> Image.Image:
    """Decode fetched input bytes, upright (EXIF orientation applied). RGBA / LA /
    P-with-alpha are composited on white, as the reference models expect."""
    if not data:
        raise RowError("missing_input", "this task needs an input image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise RowError("input_too_large", f"input image is {img.width}x{img.height} (limit {MAX_INPUT_PIXELS} pixels)")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RowError("input_too_large", f"input image is too large: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RowError("bad_image", f"undecodable input image: {e}") from None
    img = ImageOps.exif_transpose(img)
    if mode == "L":
        return img.convert("L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)


def fetch_block(block: pa.Table) -> pa.Table:
    """The fetch step: every sample's inputs as bytes (samples of one row share a fetch)."""
    samples = from_block(block)
    cache: dict[Any, bytes] = {}

    def one(value: Any) -> bytes:
        if isinstance(value, str):
            if value not in cache:
                cache[value] = fetch(value)
            return cache[value]
        return fetch(value)

    for s in samples:
        if s.failure is not None:
            continue
        try:
            s.inputs = {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in s.inputs.items()}
        except RowError as e:
            s.fail("fetch", e.kind, str(e), e.retryable)
    return to_block(samples)
