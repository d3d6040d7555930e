"""DALLE2 url model files are fetched and verified by the driver, in `prepare`, before Ray starts, and
the stages read them only from the cache: a tiny stack served by a loopback HTTP server beside its
sha256 files. A fetch that fails is one line naming the URL, before Ray; so is every family's bad
model path."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from jobs.cli import main
from jobs.driver import run_job
from modeling.dalle2.load import NotCachedError
from modeling.dalle2.tiny import CONFIG_NAME, write_tiny
from pipeline.families.dalle2 import build_prepare
from pipeline.family import StageContext
from pipeline.spec import load_spec
from tests.conftest import ROOT, TOY, FileServer, free_port, write_manifest

SERVED = ("prior.pth", "prior_config.json", "decoder.pth")  # the tiny stack's files its config names
# on CPU, the unets in the prior's actor: two actor pools start, not four
ON_CPU = ["stages.prior.num_gpus=0", "stages.decoder.colocate=true", "stages.upsampler2.colocate=true",
          "sampler.t2i.prior_steps=2", "sampler.t2i.decoder_steps=2"]
DEAD_RAY = "127.0.0.1:9"  # nothing listens there: starting or joining Ray would fail the command differently


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny stack (local files), written once for the module."""
    return write_tiny(tmp_path_factory.mktemp("tiny")).parent


@pytest.fixture
def served(tiny, tmp_path):
    """The tiny stack's weights and configs on a loopback server, each beside its sha256 (as sha256sum prints it)."""
    root = tmp_path / "remote"
    root.mkdir()
    for name in SERVED:
        shutil.copy(tiny / name, root / name)
        (root / f"{name}.sha256").write_text(f"{hashlib.sha256((root / name).read_bytes()).hexdigest()}  {name}\n")
    server = FileServer(root)
    yield server
    server.stop()


def url_stack(directory: Path, tiny: Path, entry) -> str:
    """The tiny stack's config with each file it names as `entry(name)`, beside a copy of its local CLIP."""
    directory.mkdir()
    shutil.copytree(tiny / "clip", directory / "clip")
    cfg = json.loads((tiny / CONFIG_NAME).read_text())
    for holder, key in [(cfg["prior"], "load_model_from"), (cfg["prior"], "load_config_from"),
                        (cfg["decoder"]["unet_sources"][0], "load_model_from")]:
        holder[key] = entry(holder[key]["path"])
    (directory / CONFIG_NAME).write_text(json.dumps(cfg))
    return str(directory / CONFIG_NAME)


def url(base: str, **extra):
    return lambda name: {"load_type": "url", "path": f"{base}/{name}", "checksum_file_path": f"{base}/{name}.sha256",
                         "cache_dir": "cache", **extra}


def manifest(tmp_path: Path) -> str:
    return write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "task": "t2i", "prompt": "a red cube"},
                                                        {"id": "b", "task": "t2i", "prompt": "a blue sphere"}])


PREPARE = """
import json, sys
import ray
from jobs.driver import prepare
from pipeline.spec import load_spec
fields, sets = json.loads(sys.argv[1])
prepare(load_spec(None, fields, sets))
print("ray initialized:", ray.is_initialized())
"""


def test_the_driver_fetches_url_files_before_ray_and_the_stages_read_only_the_cache(ray_cluster, served, tiny, tmp_path):
    model = url_stack(tmp_path / "model", tiny, url(served.url))
    fields = {"family": "dalle2", "model": model, "manifest": manifest(tmp_path), "output": str(tmp_path / "out")}
    # prepare in a process of its own, where Ray is not running: it must not start one
    env = {**os.environ, "RAY_ADDRESS": DEAD_RAY, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PREPARE, json.dumps([fields, ON_CPU])], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "ray initialized: False"
    # every url file and its checksum file asked for once, and the cache holds exactly what is served
    assert sorted(served.gets) == sorted(f"/{n}{s}" for n in SERVED for s in ("", ".sha256"))
    cache = tmp_path / "model" / "cache"
    for name in SERVED:
        assert hashlib.sha256((cache / name).read_bytes()).digest() == hashlib.sha256((served.root / name).read_bytes()).digest()

    served.stop()  # offline now: the job's own prepare and its stage actors have only the cache
    result = run_job(load_spec(None, fields, ON_CPU), interactive=False)
    assert result["status"] == "completed" and result["images"] == 2 and result["errors"] == 0, result
    assert set(result["stage_rows_per_second"]) == {"prepare", "prior", "decoder", "upsampler2"}
    assert len(served.gets) == 2 * len(SERVED)  # nothing reached the server after prepare


def test_a_stage_finds_a_url_file_missing_from_the_cache_and_fails_naming_it(tiny, tmp_path):
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens: a stage that fetched would fail otherwise
    model = url_stack(tmp_path / "model", tiny, url(base))
    ctx = StageContext(model, "cpu", "float32")
    with pytest.raises(NotCachedError) as e:
        build_prepare(ctx)
    message = str(e.value)
    assert f"{base}/decoder.pth is not in its cache" in message and "fetches url files in the driver before Ray" in message
    assert "\n" not in message
    cache = tmp_path / "model" / "cache"
    cache.mkdir()
    shutil.copy(tiny / "decoder.pth", cache / "decoder.pth")  # put there by hand: nothing records what it is
    with pytest.raises(NotCachedError, match="cached copy of .*decoder.pth is not what was fetched"):
        build_prepare(ctx)


def _run(argv: list[str], capsys, monkeypatch) -> tuple[int, list[str]]:
    """`genfleet run ...` in this process with RAY_ADDRESS at a dead port: (exit code, genfleet's stderr lines)."""
    monkeypatch.setenv("RAY_ADDRESS", DEAD_RAY)
    ray_was_up = ray.is_initialized()
    code = main(["run", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ray.is_initialized() == ray_was_up  # none started
    return code, [line for line in err.splitlines() if line.startswith("genfleet:")]


@pytest.mark.parametrize("fault", ["404", "bad checksum", "dead port", "dns"])
def test_a_url_file_that_cannot_be_fetched_stops_the_run_before_ray(served, tiny, tmp_path, capsys, monkeypatch, fault):
    base = {"dead port": f"http://127.0.0.1:{free_port()}", "dns": "http://nosuch.invalid"}.get(fault, served.url)
    if fault == "404":
        (served.root / "decoder.pth").unlink()  # its checksum file is still served
    elif fault == "bad checksum":
        (served.root / "decoder.pth.sha256").write_text(hashlib.sha256(b"other weights").hexdigest() + "\n")
    model = url_stack(tmp_path / "model", tiny, url(base))
    out = tmp_path / "out"
    code, lines = _run(["--family", "dalle2", "--model", model, "--manifest", manifest(tmp_path), "--output", str(out),
                        *(a for s in ON_CPU for a in ("--set", s))], capsys, monkeypatch)
    assert code == 2 and len(lines) == 1, lines
    [line] = lines
    assert line.startswith(f"genfleet: error: dalle2 model {model}: ")
    unreachable = f"checksum file {base}/prior.pth.sha256 of {base}/prior.pth cannot be read"  # the first thing asked for
    want = {"404": (f"{base}/decoder.pth cannot be fetched (HTTP 404 ",),
            "bad checksum": (f"{base}/decoder.pth: checksum mismatch", f"checksum file {base}/decoder.pth.sha256 says"),
            "dead port": (unreachable, "Connect call failed"),
            "dns": (unreachable, "gaierror")}[fault]
    assert all(w in line for w in want), line
    assert not (out / "_job.json").exists()
    assert not (tmp_path / "model" / "cache" / "decoder.pth").exists()  # nothing unverified kept


def test_every_familys_bad_model_path_is_one_line_before_ray(tiny, tmp_path, capsys, monkeypatch):
    m, nowhere = manifest(tmp_path), str(tmp_path / "nowhere")
    no_clip = url_stack(tmp_path / "no-clip", tiny, lambda name: {"load_type": "local", "path": str(tiny / name)})
    shutil.rmtree(tmp_path / "no-clip" / "clip")
    no_cache_dir = url_stack(tmp_path / "no-cache-dir", tiny, lambda name: {**url(f"http://127.0.0.1:{free_port()}")(name),
                                                                            "cache_dir": None})
    cases = [
        (["--family", "bagel", "--model", nowhere], f"bagel model {nowhere}: not a directory"),
        (["--family", "emu2", "--model", nowhere], f"emu2 model {nowhere}: not a directory"),
        (["--family", "emu1", "--model", str(tiny / CONFIG_NAME)], f"emu1 model {tiny / CONFIG_NAME}: not a directory"),
        (["--family", "dalle2", "--model", nowhere], f"dalle2 model {nowhere}: no such file"),
        (["--family", "dalle2", "--model", str(tiny)], f"dalle2 model {tiny}: is a directory; give its dalle2-laion config JSON "
                                                       f"(here: {CONFIG_NAME}, prior_config.json)"),
        (["--family", "dalle2", "--model", no_clip], f"clip.model clip: missing {tmp_path / 'no-clip' / 'clip' / 'config.json'}"),
        (["--family", "dalle2", "--model", no_cache_dir], "prior.pth has no cache_dir; give it one"),
        (["--family", TOY, "--model", "toy", "--set", f"scores.clip.model={nowhere}"], f"scores.clip.model {nowhere}: not a directory"),
    ]
    for i, (args, want) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, lines = _run([*args, "--manifest", m, "--output", str(out)], capsys, monkeypatch)
        assert code == 2 and len(lines) == 1 and want in lines[0], (args, lines)
        assert not out.exists()
