"""`python -m modeling.emu.parity KIT` on the recorded Emu kits: passes on both (exit 0), and
fails (non-zero) on a kit with a corrupted tensor or id list."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling.emu import parity
from tests.conftest import shared_fixture

KITS = ["emu2-tiny", "emu1-tiny"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _has_diffusion() -> bool:
    try:
        import modeling.emu.diffusion  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "modeling.emu.diffusion":
            raise
        return False
    return True


@pytest.mark.parametrize("name", KITS)
@pytest.mark.parametrize("batched", [False, True])
def test_llm_stage_parity(name, batched):
    ok, lines = parity.run(shared_fixture(name), batched=batched, llm_only=True)
    assert ok, "\n".join(lines)


@pytest.mark.parametrize("name", KITS)
def test_parity_cli_exit_code(name, capsys):
    if not _has_diffusion():
        pytest.skip("modeling.emu.diffusion (the diffusion side) is not in this tree yet")
    assert parity.main([str(shared_fixture(name))]) == 0
    assert "PARITY OK" in capsys.readouterr().out


@pytest.mark.parametrize("name,tensor", [("emu2-tiny", "t2i_cfg.cond.regressed"), ("emu1-tiny", "incontext.image_embeds"),
                                         ("emu2-tiny", "llm_batch.row1.last_hidden")])
def test_corrupted_tensor_fails(tmp_path, name, tensor, capsys):
    kit = shutil.copytree(shared_fixture(name), tmp_path / name)
    t = load_file(str(kit / "tensors.safetensors"))
    t[tensor] = t[tensor] * 1.001  # 1e-3 relative: ten times the tolerance
    save_file(t, str(kit / "tensors.safetensors"))
    assert parity.main([str(kit), "--llm-only"]) != 0
    out = capsys.readouterr().out
    assert "FAIL" in out and "PARITY FAILED" in out


def test_corrupted_diffusion_tensor_fails(tmp_path, capsys):
    if not _has_diffusion():
        pytest.skip("modeling.emu.diffusion (the diffusion side) is not in this tree yet")
    kit = shutil.copytree(shared_fixture("emu1-tiny"), tmp_path / "k")
    t = load_file(str(kit / "tensors.safetensors"))
    t["t2i_noguide.final_latent"] = t["t2i_noguide.final_latent"] * 1.001
    save_file(t, str(kit / "tensors.safetensors"))
    assert parity.main([str(kit)]) != 0
    assert "final_latent" in capsys.readouterr().out


def test_corrupted_prompt_ids_fail(tmp_path, capsys):
    kit = shutil.copytree(shared_fixture("emu1-tiny"), tmp_path / "k")
    spec = json.loads((kit / "kit.json").read_text())
    spec["cases"][0]["prompt_ids"][3] += 1
    (kit / "kit.json").write_text(json.dumps(spec))
    assert parity.main([str(kit), "--llm-only"]) != 0
    assert "DIFFER" in capsys.readouterr().out
