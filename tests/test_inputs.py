"""Input images: inline bytes, local paths and S3 URLs; failures are row errors."""

import io

import pytest
from PIL import Image

from pipeline.family import RowError
from pipeline.inputs import load_image
from pipeline.storage import filesystem


def png_bytes(mode="RGBA", color=(0, 0, 255, 0)):
    buf = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buf, "PNG")
    return buf.getvalue()


def test_transparent_pixels_are_composited_on_white():
    img = load_image(png_bytes())
    assert img.mode == "RGB" and img.size == (4, 3) and img.getpixel((0, 0)) == (255, 255, 255)


def test_s3_and_local_urls(bucket, tmp_path):
    fs, path = filesystem(f"{bucket}/in/x.png")
    fs.pipe_file(path, png_bytes("RGB", (1, 2, 3)))
    assert load_image(f"{bucket}/in/x.png").getpixel((1, 1)) == (1, 2, 3)
    with pytest.raises(RowError) as e:
        load_image(f"{bucket}/in/missing.png")
    assert e.value.kind == "missing_input"
    (tmp_path / "y.png").write_bytes(png_bytes("RGB", (9, 9, 9)))
    assert load_image(str(tmp_path / "y.png")).getpixel((0, 0)) == (9, 9, 9)


@pytest.mark.parametrize("value, kind", [(None, "missing_input"), (b"GIF89a-but-not-really", "bad_image"), ("", "missing_input")])
def test_bad_inputs(value, kind):
    with pytest.raises(RowError) as e:
        load_image(value)
    assert e.value.kind == kind
