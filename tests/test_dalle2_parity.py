from pathlib import Path

import pytest

from modeling.dalle2.parity import TOLERANCE, main, run_kit

KIT = Path(__file__).resolve().parents[1].parent / "shared/fixtures/dalle2-tiny"


@pytest.mark.skipif(not (KIT / "kit.json").exists(), reason=f"parity kit not found at {KIT}")
def test_tiny_kit_parity(capsys):
    results = run_kit(KIT)
    assert results, "kit has no cases"
    for cid, err, msg in results:
        assert err is not None and err <= TOLERANCE, f"{cid}: {msg} ({err})"
    assert main([str(KIT)]) == 0
    assert "PASS" in capsys.readouterr().out
