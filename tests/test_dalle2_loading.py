"""Config validation, checkpoint formats and the file cache, with real files."""

import hashlib
import json
import os
import re
import tempfile

import pytest
import torch
from packaging.version import Version
from pydantic import ValidationError
from safetensors.torch import save_file

from modeling.dalle2.checkpoint import read_checkpoint, split_checkpoint
from modeling.dalle2.config import File, ModelLoadConfig
from modeling.dalle2.convert import decoder_params, prior_params
from modeling.dalle2.decoder import Decoder
from modeling.dalle2.load import ChecksumError, NotCachedError, Stack, resolve_file
from modeling.dalle2.models import build_decoder, build_prior
from modeling.dalle2.prior import DiffusionPriorNetwork
from modeling.dalle2.tiny import DECODER, PRIOR, _randomize
from tests.conftest import FileServer


def _prior_sd(seed):
    m = DiffusionPriorNetwork(prior_params(PRIOR))
    _randomize(m, torch.Generator().manual_seed(seed))
    return {f"net.{k}": v for k, v in m.state_dict().items()}


def _decoder_sd(seed, section=DECODER, downsample=None):
    m = Decoder(decoder_params(section, downsample))
    _randomize(m, torch.Generator().manual_seed(seed))
    return m.state_dict()


def _same(model, sd, strip=""):
    got = model.state_dict()
    keys = [k for k in sd if not k.startswith("clip.")]
    assert keys and all(k[len(strip):] in got for k in keys)
    return all(torch.equal(got[k[len(strip):]].float(), sd[k].float()) for k in keys)


local = lambda p: {"load_type": "local", "path": str(p)}


# ---- config validation --------------------------------------------------------------------
def _cfg(sources, **extra):
    return {"decoder": {"unet_sources": sources}, **extra}


def _src(numbers, **kw):
    return {"unet_numbers": numbers, "load_model_from": local("d.pth"), **kw}


@pytest.mark.parametrize("cfg, message", [
    (_cfg([_src([1]), _src([3])]), "cover 1..N"),
    (_cfg([_src([2])]), "cover 1..N"),
    (_cfg([_src([1, 2]), _src([2])]), "more than one source"),
    (_cfg([_src([1], default_cond_scale=[1.0, 2.0])]), "one entry per unet"),
    (_cfg([_src([1])], bogus=1), "bogus"),
    (_cfg([_src([1], load_model_from={"load_type": "local", "path": "x", "sha": "y"})]), "sha"),
    (_cfg([_src([1], load_model_from={"load_type": "ftp", "path": "x"})]), "load_type"),
    ({"clip": {"make": "coca", "model": "x"}}, "not supported"),
])
def test_config_rejects(cfg, message):
    with pytest.raises(ValidationError, match=message):
        ModelLoadConfig.model_validate(cfg)


def test_laion_example_config_accepted_and_hf_checksum_derived():
    url = "https://huggingface.co/laion/DALLE2-PyTorch/resolve/main/decoder/v1.0.2/latest.pth"
    cfg = ModelLoadConfig.model_validate({
        "decoder": {"unet_sources": [{"unet_numbers": [1], "default_cond_scale": [1.7],
                                      "load_model_from": {"load_type": "url", "path": url, "cache_dir": "./models",
                                                          "filename_override": "new_decoder.pth"}}]},
        "clip": {"make": "openai", "model": "ViT-L/14"}, "devices": "cuda:0", "strict_loading": False,
    })
    f = cfg.decoder.unet_sources[0].load_model_from
    assert f.checksum_file_path == url.replace("resolve/main/", "raw/main/")
    assert f.filename == "new_decoder.pth"


def test_image_sizes_must_chain(tmp_path):
    torch.save({"config": {"decoder": DECODER}, "model": _decoder_sd(0)}, tmp_path / "a.pth")
    other = {**DECODER, "image_sizes": [8, 32]}
    torch.save(_decoder_sd(1, other), tmp_path / "b.pth")
    (tmp_path / "b.json").write_text(json.dumps({"decoder": other, "data": {}, "train": {}}))
    cfg = _cfg([{"unet_numbers": [1], "load_model_from": local("a.pth")},
                {"unet_numbers": [2], "load_model_from": local("b.pth"), "load_config_from": local("b.json")}])
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not chain: unet 1 makes 16"):
        Stack.from_json(tmp_path / "m.json").decoder_params()
    (tmp_path / "b.json").write_text(json.dumps({"decoder": DECODER}))
    assert Stack.from_json(tmp_path / "m.json").decoder_params().image_sizes == [16, 32]


# ---- checkpoint formats -------------------------------------------------------------------
def test_model_config_version_format(tmp_path):
    sd = _decoder_sd(0)
    torch.save({"version": Version("1.15.6"), "config": {"decoder": DECODER}, "model": sd}, tmp_path / "d.pth")
    got, section, fmt = split_checkpoint(read_checkpoint(tmp_path / "d.pth"), "decoder")
    assert fmt == "model+config" and section == DECODER
    assert _same(build_decoder(section, got), sd)


def test_bare_state_dict_with_external_train_config(tmp_path):
    sd = _prior_sd(0)
    sd["clip.text.weight"] = torch.zeros(2, 2)  # the LAION prior file carries CLIP: dropped
    torch.save(sd, tmp_path / "p.pth")
    (tmp_path / "p.json").write_text(json.dumps({"prior": PRIOR, "data": {"x": 1}, "train": {}, "tracker": {}}))
    (tmp_path / "m.json").write_text(json.dumps({"prior": {"load_model_from": local("p.pth"),
                                                           "load_config_from": local("p.json")}}))
    assert _same(Stack.from_json(tmp_path / "m.json").prior(), sd, strip="net.")
    (tmp_path / "m.json").write_text(json.dumps({"prior": {"load_model_from": local("p.pth")}}))
    with pytest.raises(ValueError, match="has no config"):
        Stack.from_json(tmp_path / "m.json").prior()


def test_trainer_checkpoints_use_ema(tmp_path):
    online, ema = _prior_sd(0), _prior_sd(1)
    torch.save({"model": online, "ema_model": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                "version": "1.15.6", "config": {"prior": PRIOR}}, tmp_path / "p.pth")
    sd, section, fmt = split_checkpoint(read_checkpoint(tmp_path / "p.pth"), "prior")
    assert fmt == "trainer-ema" and _same(build_prior(section, sd), ema, strip="net.")

    online, ema = _decoder_sd(0), _decoder_sd(1)
    ema_state = {}
    for k, v in ema.items():
        i, rest = re.match(r"unets\.(\d+)\.(.+)", k).groups()
        ema_state[f"{i}.ema_model.{rest}"] = v
        ema_state[f"{i}.step"] = torch.tensor(10)
    torch.save({"model": online, "ema": ema_state, "optimizer_unet1": {"state": {}}, "step": 5}, tmp_path / "d.pth")
    sd, section, fmt = split_checkpoint(read_checkpoint(tmp_path / "d.pth"), "decoder")
    assert fmt == "trainer-ema" and section is None
    assert _same(build_decoder(DECODER, sd), ema)


def test_safetensors_with_config_metadata(tmp_path):
    sd = _decoder_sd(2)
    save_file(sd, str(tmp_path / "d.safetensors"), metadata={"config": json.dumps({"decoder": DECODER})})
    got, section, _ = split_checkpoint(read_checkpoint(tmp_path / "d.safetensors"), "decoder")
    assert _same(build_decoder(section, got, [2]), {k: v for k, v in sd.items() if k.startswith("unets.1.")})


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_disallowed_pickle_refused(tmp_path):
    torch.save({"model": _prior_sd(0), "extra": Evil()}, tmp_path / "p.pth")
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_checkpoint(tmp_path / "p.pth")


def test_laion_layout_remaps_load_strictly(tmp_path):
    # old layout: Conv2d(k4, s2) downsampling and cross_attn.fn.*; old prior: null_text_embed only
    sd = _decoder_sd(3, downsample=["conv", "conv"])
    old = {k.replace(".cross_attn.", ".cross_attn.fn."): v for k, v in sd.items()}
    torch.save({"config": {"decoder": DECODER}, "model": old}, tmp_path / "d.pth")
    got, section, _ = split_checkpoint(read_checkpoint(tmp_path / "d.pth"), "decoder")
    dec = build_decoder(section, got)
    assert dec.params.unets[0].downsample == "conv" and _same(dec, sd)
    # no version + pre-1.10 layout = the LAION era (~1.1.0): q.k/sqrt(d) attention, old linear attention
    assert dec.params.unets[0].legacy_attention and dec.params.unets[0].legacy_linear_attention
    newer = build_decoder(section, got, version=Version("1.4.3")).params.unets[0]
    assert not newer.legacy_attention and not newer.legacy_linear_attention
    mid = build_decoder(section, got, version=Version("1.4.1")).params.unets[0]
    assert mid.legacy_attention and not mid.legacy_linear_attention
    assert not build_decoder(DECODER, _decoder_sd(5)).params.unets[0].legacy_attention

    psd = _prior_sd(4)
    old = {k: v for k, v in psd.items() if k not in ("net.null_text_embeds", "net.null_image_embed")}
    old["net.null_text_embed"] = old.pop("net.null_text_encodings")
    prior = build_prior(PRIOR, old)
    assert not prior.params.guidance_trained and prior.params.legacy_attention
    del old["net.learned_query"]
    with pytest.raises(ValueError, match="missing .*learned_query"):
        build_prior(PRIOR, old)


# ---- file cache and checksums -------------------------------------------------------------
def _pointer(data: bytes) -> str:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"


def test_url_cache_refetch_and_checksum(tmp_path):
    src, cache = tmp_path / "remote", tmp_path / "cache"
    src.mkdir()
    (src / "w.bin").write_bytes(b"version one")
    (src / "w.bin.lfs").write_text(_pointer(b"version one"))
    f = File(load_type="url", path=(src / "w.bin").as_uri(), checksum_file_path=(src / "w.bin.lfs").as_uri(),
             cache_dir="cache")
    got = resolve_file(f, tmp_path)
    assert got == cache / "w.bin" and got.read_bytes() == b"version one"
    assert (cache / "w.bin.checksum").read_text() == _pointer(b"version one")

    (src / "w.bin").write_bytes(b"version two")  # same checksum file: the cached copy is kept
    assert resolve_file(f, tmp_path).read_bytes() == b"version one"

    (src / "w.bin.lfs").write_text(_pointer(b"version two"))  # checksum changed: fetched again
    assert resolve_file(f, tmp_path).read_bytes() == b"version two"

    (src / "w.bin.lfs").write_text(_pointer(b"something else"))  # fetched file does not match
    with pytest.raises(ValueError, match="checksum mismatch"):
        resolve_file(f, tmp_path)
    assert not list(cache.glob("*.part*"))

    (src / "c.json").write_text('{"a": 1}')  # a config used as its own checksum file
    g = File(load_type="url", path=(src / "c.json").as_uri(), checksum_file_path=(src / "c.json").as_uri(),
             cache_dir=str(cache), filename_override="conf.json")
    assert resolve_file(g, tmp_path).read_text() == '{"a": 1}'


def test_local_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_file(File(load_type="local", path="nope.pth"), tmp_path)


# ---- checksum edge cases, with url files served from a loopback HTTP server -----------------
@pytest.fixture
def served(tmp_path):
    """A directory served over HTTP on 127.0.0.1: (directory, base URL, the paths GET asked for)."""
    root = tmp_path / "remote"
    root.mkdir()
    server = FileServer(root)
    yield root, server.url, server.gets
    server.stop()


HTML_404 = "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


@pytest.mark.parametrize("checksum", ["", "\n", HTML_404], ids=["empty", "blank", "html"])
def test_an_unreadable_checksum_is_an_error_unless_skipped(served, tmp_path, checksum):
    root, base, _ = served
    (root / "w.bin").write_bytes(b"weights")
    (root / "w.bin.sha").write_text(checksum)
    entry = {"load_type": "url", "path": f"{base}/w.bin", "checksum_file_path": f"{base}/w.bin.sha", "cache_dir": "cache"}
    with pytest.raises(ChecksumError) as e:
        resolve_file(File(**entry), tmp_path)
    message = str(e.value)
    assert "\n" not in message and f"{base}/w.bin.sha" in message and "unreadable checksum" in message
    assert '"checksum": "skip"' in message
    assert not (tmp_path / "cache" / "w.bin").exists()  # nothing unchecked was kept
    skipped = File(**entry, checksum="skip")  # said explicitly: loaded without a check
    assert resolve_file(skipped, tmp_path).read_bytes() == b"weights"


def test_a_file_that_is_its_own_checksum_still_verifies(served, tmp_path):
    """Hugging Face's raw/main/ of a file kept outside LFS is the file itself."""
    root, base, _ = served
    (root / "c.json").write_text('{"a": 1}')
    (root / "c.raw").write_text('{"a": 1}')
    f = File(load_type="url", path=f"{base}/c.json", checksum_file_path=f"{base}/c.raw", cache_dir="cache")
    assert resolve_file(f, tmp_path).read_text() == '{"a": 1}'
    (root / "c.raw").write_text('{"a": 2}')  # the checksum changed and the fetched file does not match it
    with pytest.raises(ChecksumError, match="unreadable checksum"):
        resolve_file(f, tmp_path)


def _served_weights(root, base: str, data: bytes) -> File:
    """`data` served as w.bin beside its LFS pointer; the File entry that names them, cached in cache/."""
    (root / "w.bin").write_bytes(data)
    (root / "w.bin.lfs").write_text(_pointer(data))
    return File(load_type="url", path=f"{base}/w.bin", checksum_file_path=f"{base}/w.bin.lfs", cache_dir="cache")


@pytest.mark.parametrize("tamper", ["same size and mtime", "truncated"])
def test_a_tampered_cached_file_is_verified_again_and_fetched_again(served, tmp_path, tamper):
    root, base, gets = served
    good = b"the real weights " * 100
    f = _served_weights(root, base, good)
    cached = resolve_file(f, tmp_path)
    assert cached.read_bytes() == good and gets.count("/w.bin") == 1
    assert resolve_file(f, tmp_path).read_bytes() == good and gets.count("/w.bin") == 1  # an intact cache is used

    st = cached.stat()
    if tamper == "truncated":
        cached.write_bytes(good[:-1])
    else:
        cached.write_bytes(good.replace(b"real", b"fake"))
        os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))  # what a size+mtime check alone would miss
    assert resolve_file(f, tmp_path).read_bytes() == good and gets.count("/w.bin") == 2

    (root / "w.bin").write_bytes(good.replace(b"real", b"fake"))  # the source is bad too: an error, never the bad bytes
    cached.write_bytes(b"x")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        resolve_file(f, tmp_path)


def test_loads_without_a_cache_dir_leave_no_temporary_directory(served, tmp_path, monkeypatch):
    root, base, gets = served
    sd = _prior_sd(0)
    torch.save(sd, root / "p.pth")
    (root / "p.json").write_text(json.dumps({"prior": PRIOR}))
    for name in ("p.pth", "p.json"):
        (root / f"{name}.lfs").write_text(_pointer((root / name).read_bytes()))
    url = lambda name: {"load_type": "url", "path": f"{base}/{name}", "checksum_file_path": f"{base}/{name}.lfs"}  # noqa: E731
    (tmp_path / "m.json").write_text(json.dumps({"prior": {"load_model_from": url("p.pth"), "load_config_from": url("p.json")}}))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where temporary copies go, so that they can be counted
    for _ in range(3):
        assert _same(Stack.from_json(tmp_path / "m.json").prior(), sd, strip="net.")
    assert gets.count("/p.pth") == 3  # each load fetched its own copy...
    assert list(scratch.iterdir()) == []  # ...and removed it


def test_an_unreachable_checksum_file_leaves_a_verified_cached_copy_in_use(served, tmp_path):
    """Offline after the fetch: the copy verified then, still intact, is used; a changed one is an error, not a load."""
    root, base, gets = served
    good = b"weights " * 50
    f = _served_weights(root, base, good)
    cached = resolve_file(f, tmp_path)
    (root / "w.bin.lfs").unlink()  # the checksum file is gone (a 404): the cached copy serves
    assert resolve_file(f, tmp_path).read_bytes() == good and gets.count("/w.bin") == 1
    assert resolve_file(f, tmp_path, fetch=False) == cached
    cached.write_bytes(good.replace(b"weights", b"changed"))
    with pytest.raises(ChecksumError, match=f"checksum file {base}/w.bin.lfs of {base}/w.bin cannot be read \\(HTTP 404"):
        resolve_file(f, tmp_path)
    with pytest.raises(NotCachedError, match="is not what was fetched"):
        resolve_file(f, tmp_path, fetch=False)
