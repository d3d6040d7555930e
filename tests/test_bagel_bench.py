"""The benchmark runs end to end at tiny size on CPU."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_bagel.py"


def test_bench_tiny(capsys):
    spec = importlib.util.spec_from_file_location("bench_bagel", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--sizes", "16", "--batch-sizes", "1", "2", "--steps", "2", "--attention", "masked", "split",
                     "--compare", "--attention-micro"]) == 0
    out = capsys.readouterr().out
    assert "| t2i | 16² | 2 |" in out and "| edit |" in out
    assert out.count("| split |") == out.count("| masked |") == 3
    rel = float(out.split("split vs masked: final latents rel L2 ")[1].split()[0])
    assert rel < 1e-5
    assert "# attention of one layer, 16² batch 2 with CFG (4 x 3 tokens), split:" in out
