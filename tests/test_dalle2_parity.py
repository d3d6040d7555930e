

from modeling.dalle2.parity import TOLERANCE, main, run_kit
from tests.conftest import FIXTURES, shared_fixture

KIT = FIXTURES / "dalle2-tiny"


def test_tiny_kit_parity(capsys):
    shared_fixture("dalle2-tiny/kit.json")
    results = run_kit(KIT)
    assert results, "kit has no cases"
    for cid, err, msg in results:
        assert err is not None and err <= TOLERANCE, f"{cid}: {msg} ({err})"
    assert main([str(KIT)]) == 0
    assert "PASS" in capsys.readouterr().out
