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
