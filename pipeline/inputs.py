"""Input images: fetched by the runner (bytes or a URL/path), decoded by the family.

Fetching is I/O and runs in its own CPU step before the family's stages, under the job's
FetchPolicy (pipeline/policy.py) and its byte and pixel limits: a refused, missing or
oversized input is the row's permanent error; a store that fails transiently is retried
here and, if it still fails, recorded as retryable so that a later run tries again.
Decoding is the family's (it knows the mode it needs) through `decode_image`.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.policy import FetchPolicy
from pipeline.retry import is_transient, with_retries
from pipeline.rows import map_samples
from pipeline.sample import RowError, Sample
from pipeline.storage import filesystem, redact

MAX_INPUT_PIXELS = 64 * 1024 * 1024  # decoded size; a larger header is a decompression bomb
CHUNK = 1 << 20


def _read_capped(fs, path: str, where: str, max_bytes: int) -> bytes:
    """Stream at most max_bytes (a device file or a huge object never fills memory)."""
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise RowError("input_too_large", f"input {where} is {size} bytes (limit inputs.max_bytes = {max_bytes})")
    out = bytearray()
    with fs.open(path, "rb") as f:
        while chunk := f.read(min(CHUNK, max_bytes + 1 - len(out))):
            out += chunk
            if len(out) > max_bytes:
                raise RowError("input_too_large", f"input {where} is over {max_bytes} bytes (limit inputs.max_bytes)")
    return bytes(out)


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header claims more pixels than allowed, before anyone decodes it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            w, h = Image.open(io.BytesIO(data)).size  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RowError("input_too_large", "input image header claims a decompression bomb") from None
    except Exception:  # noqa: BLE001 - not an image the header reader knows: the family's decode says why
        return
    if w * h > max_pixels:
        raise RowError("input_too_large", f"input image is {w}x{h} (limit inputs.max_pixels = {max_pixels})")


def fetch(value: bytes | str | None, policy: FetchPolicy) -> bytes:
    """The raw bytes of an input given inline or as a URL / path the policy allows."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise RowError("missing_input", "input image is empty")
        data = bytes(value)
        if len(data) > policy.max_bytes:
            raise RowError("input_too_large", f"inline input is {len(data)} bytes (limit inputs.max_bytes = {policy.max_bytes})")
        _check_pixels(data, policy.max_pixels)
        return data
    if not isinstance(value, str) or not value.strip():
        raise RowError("missing_input", "input image is empty")
    policy.check(value)
    where = redact(value)

    def read() -> bytes:
        fs, path = filesystem(value)
        return _read_capped(fs, path, where, policy.max_bytes)

    try:
        data = with_retries(read, what=f"fetch {where}")
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
    _check_pixels(data, policy.max_pixels)
    return data


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


def fetch_block(block: pa.Table, *, policy: FetchPolicy) -> pa.Table:
    """The fetch step: every sample's inputs as bytes (samples of one row share a fetch)."""
    cache: dict[Any, bytes] = {}

    def one(value: Any) -> bytes:
        if isinstance(value, str):
            if value not in cache:
                cache[value] = fetch(value, policy)
            return cache[value]
        return fetch(value, policy)

    def fetch_all(samples: list[Sample]) -> None:
        for s in samples:
            if s.failure is not None:
                continue
            try:
                s.inputs = {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in s.inputs.items()}
            except RowError as e:
                s.fail("fetch", e.kind, str(e), e.retryable)

    return map_samples(block, fetch_all)
