"""Input images: fetched inline, from local paths and S3 URLs; decoding; failures are row errors
that say whether a later run may cure them."""

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from pipeline.inputs import decode_image, fetch
from pipeline.policy import FetchPolicy
from pipeline.sample import RowError
from pipeline.storage import filesystem
from tests.conftest import free_port

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 22}


def policy(manifest="s3://mine/m.parquet", **kw):
    return FetchPolicy.for_manifest(manifest, **{**LIMITS, **kw})


def png_header(width, height) -> bytes:
    """A PNG that is all header: it claims width x height pixels (no pixel data at all)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


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
    own = policy(f"{bucket}/manifests/m.parquet")
    assert decode_image(fetch(f"{bucket}/in/x.png", own)).getpixel((1, 1)) == (1, 2, 3)
    with pytest.raises(RowError) as e:
        fetch(f"{bucket}/in/missing.png", own)
    assert e.value.kind == "missing_input" and not e.value.retryable
    (tmp_path / "y.png").write_bytes(png_bytes("RGB", (9, 9, 9)))
    local = policy(str(tmp_path / "m.parquet"), allow_local=[str(tmp_path)])
    assert decode_image(fetch(str(tmp_path / "y.png"), local)).getpixel((0, 0)) == (9, 9, 9)
    assert decode_image(fetch(f"file://{tmp_path / 'y.png'}", local)).getpixel((0, 0)) == (9, 9, 9)


def test_an_unreachable_store_is_retryable(monkeypatch):
    monkeypatch.setattr("pipeline.retry.time.sleep", lambda s: None)  # the backoff itself is not under test
    port = free_port()
    with pytest.raises(RowError) as e:
        fetch(f"http://127.0.0.1:{port}/nothing-listens-here.png", policy(allow_urls=[f"http://127.0.0.1:{port}/"]))
    assert e.value.kind == "input_unavailable" and e.value.retryable


@pytest.mark.parametrize("value, kind", [(None, "missing_input"), (b"", "missing_input"), ("", "missing_input")])
def test_missing_inputs(value, kind):
    with pytest.raises(RowError) as e:
        fetch(value, policy())
    assert e.value.kind == kind


def refused(url, pol) -> str:
    with pytest.raises(RowError) as e:
        fetch(url, pol)
    assert e.value.kind == "input_not_allowed" and not e.value.retryable
    return str(e.value)


def test_the_fetch_policy_keeps_manifests_off_local_disks_and_private_networks(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ok.png").write_bytes(png_bytes("RGB", (1, 1, 1)))
    os.symlink("/etc/passwd", tmp_path / "root" / "escape.png")
    default = policy()
    assert "inputs.allow_local" in refused("file:///etc/passwd", default)
    assert "inputs.allow_local" in refused("/etc/passwd", default)
    assert "inputs.allow_local" in refused(str(tmp_path / "root" / "ok.png"), default)
    rooted = policy(allow_local=[str(tmp_path / "root")])
    assert fetch(str(tmp_path / "root" / "ok.png"), rooted)
    assert "inputs.allow_local" in refused(str(tmp_path / "root" / "escape.png"), rooted)  # resolved before the check
    assert "inputs.allow_local" in refused(str(tmp_path / "root" / ".." / "root2"), rooted)
    assert "not in the manifest's bucket" in refused("s3://someone-else/x.png", default)
    assert "http(s) inputs" in refused("http://127.0.0.1:9/internal/secret", default)
    assert "scheme 'ftp'" in refused("ftp://example.com/x.png", policy(allow_urls=["ftp://"]))
    # a listed host that resolves to a private address is still refused; the address itself may be listed
    lying_dns = lambda host, port: [(2, 1, 6, "", ("10.0.0.7", 0))]  # noqa: E731
    listed = FetchPolicy.for_manifest("s3://mine/m", allow_urls=["https://images.example.com/"], **LIMITS)
    listed = FetchPolicy(**{**listed.__dict__, "resolve": lying_dns})
    assert "resolves to 10.0.0.7" in refused("https://images.example.com/a.png", listed)
    assert "resolves to 127.0.0.1" in refused("http://localhost:9/a", policy(allow_urls=["http://localhost:9/"]))


def test_reads_are_bounded(tmp_path):
    pol = policy(allow_local=["/dev", str(tmp_path)])
    with pytest.raises(RowError) as e:
        fetch("/dev/zero", pol)  # endless: read up to the limit, not until memory runs out
    assert e.value.kind == "input_too_large"
    with pytest.raises(RowError) as e:
        fetch(png_header(100_000, 100_000), pol)
    assert e.value.kind == "input_too_large" and "decompression bomb" in str(e.value)
    with pytest.raises(RowError) as e:
        fetch(png_header(4000, 2000), pol)  # 8 Mpixel > the 4 Mpixel limit here
    assert e.value.kind == "input_too_large" and "4000x2000" in str(e.value)
    (tmp_path / "big.bin").write_bytes(b"x" * (LIMITS["max_bytes"] + 1))
    with pytest.raises(RowError) as e:
        fetch(str(tmp_path / "big.bin"), pol)
    assert e.value.kind == "input_too_large"


def test_undecodable_and_oversized_images():
    with pytest.raises(RowError) as e:
        decode_image(b"GIF89a-but-not-really")
    assert e.value.kind == "bad_image"
    bomb = png_bytes("L", 0, size=(9000, 9000))  # 81 Mpixel of one colour: a few kB of PNG
    assert len(bomb) < 200_000
    with pytest.raises(RowError) as e:
        decode_image(bomb)
    assert e.value.kind == "input_too_large"
