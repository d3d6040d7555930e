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


def test_bench_approx_variants_report_their_drift(capsys):
    spec = importlib.util.spec_from_file_location("bench_bagel", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--sizes", "32", "--batch-sizes", "2", "--steps", "12", "--no-edit",
                     "--approx", "fp8+cache:3", "cache:2", "fp8"]) == 0
    rows = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| exact |") or line.startswith("| fp8") or line.startswith("| cache")}
    assert list(rows) == ["exact", "cache:2", "fp8+cache:3", "fp8"]  # bf16 variants before the FP8 conversion
    for name in ("cache:2", "fp8", "fp8+cache:3"):
        rel, psnr = float(rows[name][6]), float(rows[name][7].split("/")[0])
        assert 0 < rel < 0.05 and 30 < psnr < float("inf"), (name, rel, psnr)  # approximate, and close
