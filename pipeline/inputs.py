"""Input images for edit / variation / understand rows: bytes or a URL/path."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from pipeline.family import RowError
from pipeline.storage import filesystem, redact

MAX_INPUT_BYTES = 64 * 1024 * 1024


def read_input(value: bytes | str) -> bytes:
    """The raw bytes of an input given inline or as a URL / path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise RowError("missing_input", "input image is empty")
    try:
        fs, path = filesystem(value)
        size = fs.size(path)
        if size is not None and size > MAX_INPUT_BYTES:
            raise RowError("bad_input", f"input {redact(value)} is {size} bytes (limit {MAX_INPUT_BYTES})")
        return fs.cat_file(path)
    except RowError:
        raise
    except FileNotFoundError:
        raise RowError("missing_input", f"input {redact(value)} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any fetch failure is this row's problem
        raise RowError("missing_input", f"cannot read {redact(value)}: {type(e).__name__}: {redact(str(e))}") from None


def load_image(value: bytes | str | None, mode: str = "RGB") -> Image.Image:
    """Decode an input image. RGBA/LA/P-with-alpha are composited on white, as the
    reference models expect; raises RowError for missing or undecodable input."""
    if value is None:
        raise RowError("missing_input", "this task needs an input image")
    data = read_input(value)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RowError("bad_image", f"undecodable input image: {e}") from None
    if mode == "L":
        return img.convert("L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)
