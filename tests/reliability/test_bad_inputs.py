"""The bad-input corpus: one table of named cases, each with the error kind it must produce or
"accepted", run as ONE job with good rows among them. The job completes, every accepted pair
is committed exactly once, every bad row is in errors with its kind and nothing else, and
committed == expected. Input URLs go through the fetch policy for real: files under an
allowed root, paths and URLs outside it, a loopback HTTP server that must see only the
requests the policy allows. The manifest is a directory as Spark leaves it."""

import functools
import io
import json
import os
import struct
import tarfile
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.driver import run_job
from pipeline.resume import begin_run, check_output, read_job
from pipeline.spec import load_spec
from tests.conftest import TOY, write_manifest
from tests.reliability.conftest import images_by_key
from tests.test_job_s3 import read

pytestmark = pytest.mark.reliability

MAX_PROMPT = 64
MAX_BYTES = 256 * 1024
MAX_PIXELS = 1_000_000
LONG_ID = "long-" + "z" * 150
FORGED = "p\x1f0\x1ex\x1f0\x1ey"  # spells the keys of p, x and y in the old shard-name encoding
INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # the error kind the row must produce, or "accepted"
    row: dict = field(default_factory=dict)  # manifest fields; the id is the name unless given


def image(size=(8, 8), mode="RGB", color=(200, 30, 30), fmt="PNG", exif_rotate=False) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size, color)
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # shown rotated 90 degrees clockwise
        img.save(buf, "JPEG", exif=exif.tobytes())
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def png_header(width, height) -> bytes:
    """A PNG that is all header: it claims width x height pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def input_files(root) -> None:
    """The files the edit cases name, under the job's allowed root (and one beside it)."""
    files = {
        "ok.png": image(), "exif.jpg": image((12, 4), exif_rotate=True), "rgba.png": image(mode="RGBA", color=(0, 0, 255, 0)),
        "palette.png": image(mode="P", color=3), "gray.png": image(mode="L", color=90),
        "bomb.png": image((9000, 9000), mode="L", color=0),  # 81 Mpixel of one colour: a few kB
        "header-bomb.png": png_header(100_000, 100_000), "big-pixels.png": image((1200, 1000), mode="L", color=0),
        "big-bytes.bin": os.urandom(MAX_BYTES + 1), "truncated.png": image((64, 64), color=(1, 2, 3))[:60],
        "text.png": b"this is not an image\n", "gif-header.gif": b"GIF89a-but-not-really", "empty.png": b"",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "a-directory").mkdir()
    os.symlink(root / "ok.png", root / "link-inside.png")
    os.symlink("/etc/passwd", root / "link-to-passwd.png")
    (root.parent / "outside.png").write_bytes(image())


def cases(root, http) -> list[Case]:
    edit = lambda value, **kw: {"task": "edit", "prompt": "edit it", "image": value, **kw}  # noqa: E731
    deep = '{"gain": ' + "[" * 100_000 + "]" * 100_000 + "}"
    return [
        # accepted: odd but legitimate
        Case("plain", "accepted"),
        Case("p", "accepted"), Case("x", "accepted"), Case("y", "accepted"),
        Case("id spelling other keys", "accepted", {"id": FORGED}),
        Case("long id", "accepted", {"id": LONG_ID, "width": 12.0, "height": 10.0, "num_samples": 2.0}),
        Case("unicode prompt", "accepted", {"prompt": "ein Bär 🐻 على الطاولة e\u0301"}),
        Case("control characters in prompt", "accepted", {"prompt": "a\x00b\x1fc\u202e"}),
        Case("prompt at the limit", "accepted", {"prompt": "p" * MAX_PROMPT}),
        Case("negative prompt", "accepted", {"negative_prompt": "blurry"}),
        Case("params override, three samples", "accepted", {"params": '{"gain": 0.5}', "num_samples": 3.0}),
        Case("params null field", "accepted", {"params": '{"gain": null}'}),
        Case("seed zero", "accepted", {"seed": 0.0}),
        Case("seed 2^53", "accepted", {"seed": float(2**53)}),
        Case("task null is t2i", "accepted", {"task": None}),
        Case("image on a t2i row is ignored", "accepted", {"image": "/etc/passwd"}),
        Case("duplicate id: the first runs", "accepted", {"id": "dup"}),
        Case("edit exif-rotated jpeg", "accepted", edit(f"{root}/exif.jpg")),
        Case("edit transparent png", "accepted", edit(f"{root}/rgba.png")),
        Case("edit palette png", "accepted", edit(f"{root}/palette.png")),
        Case("edit grayscale png", "accepted", edit(f"{root}/gray.png")),
        Case("edit file:// under the root", "accepted", edit(f"file://{root}/ok.png")),
        Case("edit symlink within the root", "accepted", edit(f"{root}/link-inside.png")),
        Case("edit listed http address", "accepted", edit(f"{http}/ok/ok.png")),
        # rows the runner refuses
        Case("empty prompt", "empty_prompt", {"prompt": ""}),
        Case("blank prompt", "empty_prompt", {"prompt": " \t\n"}),
        Case("null prompt", "empty_prompt", {"prompt": None}),
        Case("prompt over the limit", "prompt_too_long", {"prompt": "p" * (MAX_PROMPT + 1)}),
        Case("prompt not utf-8", "bad_text", {"prompt": b"caf\xe9 \xff"}),
        Case("null id", "missing_id", {"id": None}),
        Case("duplicate id: a later row", "duplicate_id", {"id": "dup"}),
        Case("unknown task", "unsupported_task", {"task": "video"}),
        Case("task of another family", "unsupported_task", {"task": "understand"}),
        Case("negative seed", "bad_seed", {"seed": -1.0}),
        Case("fractional seed", "bad_seed", {"seed": 1.5}),
        Case("infinite seed", "bad_seed", {"seed": INF}),
        Case("minus infinite seed", "bad_seed", {"seed": -INF}),
        Case("NaN seed", "bad_seed", {"seed": NAN}),
        Case("seed over 2^63", "bad_seed", {"seed": 1e19}),
        Case("infinite width", "bad_width", {"width": INF}),
        Case("zero width", "bad_width", {"width": 0.0}),
        Case("width over 8192", "bad_width", {"width": 9000.0}),
        Case("minus infinite height", "bad_height", {"height": -INF}),
        Case("fractional height", "bad_height", {"height": 2.5}),
        Case("infinite num_samples", "bad_num_samples", {"num_samples": INF}),
        Case("zero num_samples", "bad_num_samples", {"num_samples": 0.0}),
        Case("negative num_samples", "bad_num_samples", {"num_samples": -1.0}),
        Case("num_samples over 64", "bad_num_samples", {"num_samples": 65.0}),
        Case("fractional num_samples", "bad_num_samples", {"num_samples": 1.5}),
        Case("params not JSON", "bad_params", {"params": "{"}),
        Case("params a JSON array", "bad_params", {"params": "[1]"}),
        Case("params nested 100000 deep", "bad_params", {"params": deep}),
        Case("params unknown field", "bad_params", {"params": '{"nope": 1}'}),
        Case("params out of range", "bad_params", {"params": '{"size": 0}'}),
        Case("params wrong type", "bad_params", {"params": '{"gain": "loud"}'}),
        # inputs: missing, refused by the fetch policy, too large, undecodable
        Case("edit without image", "missing_input", edit(None)),
        Case("edit empty image url", "missing_input", edit("")),
        Case("edit missing file under the root", "missing_input", edit(f"{root}/nope.png")),
        Case("edit directory", "missing_input", edit(f"{root}/a-directory")),
        Case("edit empty file", "missing_input", edit(f"{root}/empty.png")),
        Case("edit missing http file", "missing_input", edit(f"{http}/ok/nope.png")),
        Case("edit file:///etc/passwd", "input_not_allowed", edit("file:///etc/passwd")),
        Case("edit /etc/passwd", "input_not_allowed", edit("/etc/passwd")),
        Case("edit /proc/self/environ", "input_not_allowed", edit("/proc/self/environ")),
        Case("edit symlink out of the root", "input_not_allowed", edit(f"{root}/link-to-passwd.png")),
        Case("edit ../ out of the root", "input_not_allowed", edit(f"{root}/../outside.png")),
        Case("edit relative path", "input_not_allowed", edit("inputs/ok.png")),
        Case("edit unlisted loopback path", "input_not_allowed", edit(f"{http}/internal/secret.png")),
        Case("edit listed name resolving to loopback", "input_not_allowed", edit(f"{http.replace('127.0.0.1', 'localhost')}/ok/ok.png")),
        Case("edit cloud metadata address", "input_not_allowed", edit("http://169.254.169.254/latest/meta-data/")),
        Case("edit another bucket", "input_not_allowed", edit("s3://someone-else/x.png")),
        Case("edit memory://", "input_not_allowed", edit("memory://x.png")),
        Case("edit ftp://", "input_not_allowed", edit("ftp://example.com/x.png")),
        Case("edit data: url", "input_not_allowed", edit("data:image/png;base64,iVBORw0KGgo=")),
        Case("edit /dev/zero (its dir allowed)", "input_too_large", edit("/dev/zero")),
        Case("edit file over max_bytes", "input_too_large", edit(f"{root}/big-bytes.bin")),
        Case("edit header claims 10^10 pixels", "input_too_large", edit(f"{root}/header-bomb.png")),
        Case("edit decompression bomb", "input_too_large", edit(f"{root}/bomb.png")),
        Case("edit over max_pixels", "input_too_large", edit(f"{root}/big-pixels.png")),
        Case("edit truncated png", "bad_image", edit(f"{root}/truncated.png")),
        Case("edit text file", "bad_image", edit(f"{root}/text.png")),
        Case("edit gif header only", "bad_image", edit(f"{root}/gif-header.gif")),
        # the family's own verdicts
        Case("family rejects the sample", "rejected", {"prompt": "reject"}),
        Case("stage raises for the batch", "RuntimeError", {"prompt": "explode"}),
    ]


def row_id(c: Case) -> str:
    return c.row.get("id", c.name) or ""  # a null id is recorded as ""


def manifest_table(all_cases: list[Case]) -> pa.Table:
    rows = [{"id": c.name, "prompt": "ok", "task": "t2i", "seed": None, "width": None, "height": None, "num_samples": 1.0,
             "params": None, "negative_prompt": None, "image": None, **c.row} for c in all_cases]
    col = lambda name: [r[name] for r in rows]  # noqa: E731
    prompts = [p.encode() if isinstance(p, str) else p for p in col("prompt")]
    n = len(rows)
    return pa.table({
        "id": pa.array(col("id"), pa.string()), "prompt": pa.array(prompts, pa.binary()).view(pa.string()),
        "task": pa.array(col("task"), pa.string()),
        **{name: pa.array(col(name), pa.float64()) for name in ("seed", "width", "height", "num_samples")},
        **{name: pa.array(col(name), pa.string()) for name in ("params", "negative_prompt", "image")},
        # manifest columns named like the runner's own output columns and internals
        **{name: pa.array([f"forged-{name}"] * n) for name in ("model", "family", "format", "sampler", "text", "sample_seed")},
        "sample_index": pa.array([7] * n, pa.int64()), "_ordinal": pa.array(range(100, 100 + n), pa.int64()),
    })


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server: (base URL, the paths it was asked for)."""
    served, asked = tmp_path / "served", []
    (served / "ok").mkdir(parents=True)
    (served / "ok" / "ok.png").write_bytes(image())
    (served / "internal").mkdir()
    (served / "internal" / "secret.png").write_bytes(image())

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            asked.append(self.path)
            return super().send_head()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()


def test_every_bad_input_is_its_row_error_and_the_rest_lands(ray_cluster, http_server, tmp_path):
    http, asked = http_server
    root = tmp_path / "inputs"
    root.mkdir()
    input_files(root)
    all_cases = cases(root, http)
    assert len({c.name for c in all_cases}) == len(all_cases)
    assert len({c.expect for c in all_cases} - {"accepted"}) >= 15 and len(all_cases) >= 80

    # a manifest directory as Spark leaves it: a marker, a crc file, an unfinished attempt's rows
    mdir = tmp_path / "manifest"
    mdir.mkdir()
    pq.write_table(manifest_table(all_cases), mdir / "part-00000.parquet")
    (mdir / "_SUCCESS").write_bytes(b"")
    (mdir / ".part-00000.parquet.crc").write_bytes(b"crc\x00garbage")
    write_manifest(str(mdir / "_temporary" / "0" / "part-00001.parquet"), [{"id": "spark-temporary", "prompt": "ok"}])

    out = str(tmp_path / "out")
    sets = ["stages.shade.device=cpu", "outputs.webdataset=true", "outputs.rows_per_shard=64", "errors.max_rate=1",
            f"max_prompt_chars={MAX_PROMPT}", f"inputs.allow_local=[{root}, /dev]", f"inputs.max_bytes={MAX_BYTES}",
            f"inputs.max_pixels={MAX_PIXELS}", f"inputs.allow_urls=[{http}/ok/, {http.replace('127.0.0.1', 'localhost')}/ok/]"]
    result = run_job(load_spec(None, {"family": TOY, "model": "toy", "manifest": str(mdir), "output": out}, sets), interactive=False)

    # what each case produced: "accepted" (all its samples landed, no error) or the kinds of its errors
    images = images_by_key(out)  # each pair at most once
    errors = read(out, "errors").to_pylist()
    kinds: dict[str, Counter] = {}
    for e in errors:
        kinds.setdefault(e["id"], Counter())[e["kind"]] += 1
    samples = Counter(i for i, _ in images)
    want_images: Counter = Counter()
    want_kinds: dict[str, Counter] = {}
    for c in all_cases:
        if c.expect == "accepted":
            want_images[row_id(c)] += int(c.row.get("num_samples", 1))
        else:  # a row's error stands for the row (one record); a stage's exception, for each sample
            want_kinds.setdefault(row_id(c), Counter())[c.expect] += 1
    wrong = [f"{c.name}: expected {c.expect}, got {samples[row_id(c)]} image(s) and errors {dict(kinds.get(row_id(c), {}))}"
             for c in all_cases
             if samples[row_id(c)] != want_images[row_id(c)] or kinds.get(row_id(c), Counter()) != want_kinds.get(row_id(c), Counter())]
    assert wrong == [], "\n".join(wrong)
    assert set(samples) == set(want_images) and set(kinds) == set(want_kinds)  # nothing from outside the table (Spark's debris)

    assert result["status"] == "completed" and result["committed"] == result["expected"] == sum(want_images.values()) + len(errors)
    # the policy kept the job off the internal path: the server saw only what allow_urls lists
    assert asked and all(p.startswith("/ok/") for p in asked), asked

    rows = read(out, "images").to_pylist()
    for r in rows:  # provenance is the job's; the manifest's same-named columns ride along renamed
        assert (r["model"], r["family"], r["format"]) == ("toy-v1", "toy", "png") and r["extra_model"] == "forged-model"
        assert r["extra_sample_index"] == 7 and r["_ordinal"] >= 100 and r["extra_sample_seed"] == "forged-sample_seed"
    exif = next(r for r in rows if r["id"] == "edit exif-rotated jpeg")
    assert (exif["width"], exif["height"]) == (16, 16)  # the toy resizes its input to its output size; decoding went upright
    tars = list((tmp_path / "out" / "webdataset").glob("*.tar"))
    for t in tars:
        with tarfile.open(t) as tar:
            assert all(len(m.name) <= 100 for m in tar.getmembers())
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert summary["errors_by_kind"] == dict(sum((k for k in kinds.values()), Counter()))


def test_presigned_manifest_urls_are_redacted_where_written(tmp_path):
    out = str(tmp_path / "out")
    url = "https://store.example/m.parquet?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef&X-Amz-Security-Token=sessiontok"
    log = check_output(out, {"f": 1}, new_run=False)
    begin_run(out, {"f": 1}, manifest=url, expected_pairs=1, new_run=False, retry_errors=False, log=log)
    written = (tmp_path / "out" / "_job.json").read_text()
    for secret in ("AKIAEXAMPLE", "deadbeef", "sessiontok"):
        assert secret not in written
    assert read_job(out)["manifest"].startswith("https://store.example/m.parquet?")
