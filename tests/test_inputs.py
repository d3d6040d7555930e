"""Input images: fetched inline, from local paths and S3 URLs; decoding; failures are row errors
that say whether a later run may cure them."""

import io

import pytest
from PIL import Image

from pipeline.inputs import decode_image, fetch
from pipeline.sample import RowError
from pipeline.storage import filesystem
from tests.conftest import free_port


def png_bytes(mode="RGBA", color=(0, 0, 255, 0), size=(4, 3)):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def test_transparent_pixels_are_composited_on_white():
    img = decode_image(png_bytes())
    assert img.mode == "RGB" and img.size == (4, 3) and img.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (12, 4), (10, 20, 30))
    img.paste((250, 0, 0), (0, 0, 4, 4))  # a red block at the left end
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=100)
    upright = decode_image(buf.getvalue())
    assert upright.size == (4, 12)  # as a viewer shows it
    assert upright.getpixel((2, 1))[0] > 200 and upright.getpixel((2, 10))[0] < 60  # the left end is now on top


def test_s3_and_local_urls(bucket, tmp_path):
    fs, path = filesystem(f"{bucket}/in/x.png")
    fs.pipe_file(path, png_bytes("RGB", (1, 2, 3)))
    assert decode_image(fetch(f"{bucket}/in/x.png")).getpixel((1, 1)) == (1, 2, 3)
    with pytest.raises(RowError) as e:
        fetch(f"{bucket}/in/missing.png")
    assert e.value.kind == "missing_input" and not e.value.retryable
    (tmp_path / "y.png").write_bytes(png_bytes("RGB", (9, 9, 9)))
    assert decode_image(fetch(str(tmp_path / "y.png"))).getpixel((0, 0)) == (9, 9, 9)


def test_an_unreachable_store_is_retryable(monkeypatch):
    monkeypatch.setattr("pipeline.retry.time.sleep", lambda s: None)  # the backoff itself is not under test
    with pytest.raises(RowError) as e:
        fetch(f"http://127.0.0.1:{free_port()}/nothing-listens-here.png")
    assert e.value.kind == "input_unavailable" and e.value.retryable


@pytest.mark.parametrize("value, kind", [(None, "missing_input"), (b"", "missing_input"), ("", "missing_input")])
def test_missing_inputs(value, kind):
    with pytest.raises(RowError) as e:
        fetch(value)
    assert e.value.kind == kind


def test_undecodable_and_oversized_images():
    with pytest.raises(RowError) as e:
        decode_image(b"GIF89a-but-not-really")
    assert e.value.kind == "bad_image"
    bomb = png_bytes("L", 0, size=(9000, 9000))  # 81 Mpixel of one colour: a few kB of PNG
    assert len(bomb) < 200_000
    with pytest.raises(RowError) as e:
        decode_image(bomb)
    assert e.value.kind == "input_too_large"
