"""The Emu benchmark runs end to end at tiny size on CPU (genfleet's side; the reference is not in the repo)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_emu.py"


def test_bench_tiny(capsys):
    spec = importlib.util.spec_from_file_location("bench_emu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--models", "emu1", "emu2", "--ar-batch-sizes", "2", "--repeats", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for model in ("emu1", "emu2"):
        assert f"| {model} | AR | genfleet | eager | 2 |" in out
        assert f"| {model} | t2i | genfleet | eager | 2 |" in out
    assert "images (2, 64, 64, 3) torch.uint8" in out


def test_random_checkpoint_in_the_released_layout_loads_back_as_built(tmp_path):
    """bench/emu_checkpoint.py's folder (encoder shards spilled to another folder and linked, as
    on a machine whose disk is too small) holds exactly the weights the bench draws."""
    import sys

    import torch

    sys.path.insert(0, str(BENCH.parent))
    from bench_emu import build_ours
    from emu_checkpoint import write_checkpoint

    from modeling.emu.decoder import load_decoder
    from modeling.emu.load import check_layout, load_encoder

    folder, ram = tmp_path / "Emu2-Gen", tmp_path / "ram"
    info = write_checkpoint(folder, True, "cpu", None, ram, shard_gb=0.004, keep_free_gb=2**40)  # every shard spills
    assert info["shards"] >= 3 and len(info["spilled_shards"]) == info["shards"] and info["encoder_disk_bytes"] == 0
    assert all((folder / "multimodal_encoder" / n).is_symlink() for n in info["spilled_shards"])
    assert check_layout(folder, safety_checker=True) == "emu2"
    enc, dec = build_ours("emu2", True, torch.device("cpu"), torch.float32)
    loaded = load_encoder(folder).state_dict()
    assert loaded.keys() == enc.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in enc.state_dict().items())
    back = load_decoder(folder, "emu2", safety_checker=True)
    for kind in ("unet", "vae", "safety_checker"):
        want, got = getattr(dec, kind).state_dict(), getattr(back, kind).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items()), kind
