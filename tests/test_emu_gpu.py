"""On a GPU (run on the GPU machine; CPU-only CI has none): the CUDA-graph step gives the eager
step's numbers, for several batch sizes replayed in turn and after the cache grows."""

import pytest
import torch

from modeling.emu import regress as R
from modeling.emu.load import load_encoder, load_tokenizer
from tests.conftest import shared_fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kit", ["emu2-tiny", "emu1-tiny"])
def test_graph_step_equals_eager(kit):
    d = shared_fixture(f"{kit}/kit.json").parent
    enc, tok = load_encoder(d, "cuda", torch.float32), load_tokenizer(d)
    enc.setup_caches(4, 64)
    texts = ["a red cube", "a dog on a beach at sunset", "", "two cats"]
    graphed = R.GraphedStep()
    for batch in (4, 1, 3, 4):
        x, valid = R.prompt_inputs(enc, [tok.encode([t]) for t in texts[:batch]], [None] * batch)
        eager = R.regress(enc, x, valid).embeds.clone()
        replayed = R.regress(enc, x, valid, step=graphed).embeds
        assert rel(replayed, eager) < 1e-5
    assert {b for b, _ in graphed.graphs} == {1, 3, 4}
    long = tok.encode(["word " * 80])  # past the 64-token cache: it grows, the graphs are re-captured
    x, valid = R.prompt_inputs(enc, [long], [None])
    eager = R.regress(enc, x, valid).embeds.clone()
    assert rel(R.regress(enc, x, valid, step=graphed).embeds, eager) < 1e-5
    assert list(graphed.graphs) == [(1, enc.decoder.max_len)]
