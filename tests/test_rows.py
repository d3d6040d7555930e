"""Samples as block columns (pipeline/rows.py): every field a step sets comes back from the
block as it went in, one sample per row, through Arrow slicing and concatenation as Ray does."""

import gc

import numpy as np
import pyarrow as pa

from pipeline.family import Params
from pipeline.gcpause import gc_paused
from pipeline.rows import concat_blocks, from_block, to_block
from pipeline.sample import Outputs, Sample


class P(Params):
    steps: int = 4
    scale: float = 1.5


def samples() -> list[Sample]:
    shared = P(steps=7)
    full = Sample(id="a", sample_index=2, task="edit", prompt="a cat", negative_prompt="blur", seed=3, sample_seed=2**63 - 1,
                  width=64, height=32, params=shared, inputs={"image": b"\x89PNG"}, extras={"tag": "x", "n": 4},
                  state={"latent": np.arange(6, dtype=np.float16).reshape(2, 3)}, covers=1, ordinal=9, content=2**64 - 1,
                  outputs=Outputs(pixels=np.full((2, 2, 3), 7, np.uint8), embeddings={"e": np.ones(3, np.float32)}, text="t",
                                  scores={"clip_score": 31.5, "nsfw": False}),
                  stage_seconds={"prior": 0.25, "decoder": 1.5})
    encoded = Sample(id="b", sample_index=0, task="t2i", prompt="p", params=shared,
                     outputs=Outputs(image=b"img", image_size=(64, 32)))
    failed = Sample(id="c", sample_index=-1, task="t2i", covers=3)
    failed.fail("validate", "empty_prompt", "prompt is empty", retryable=True)
    bare = Sample(id="d", sample_index=0, task="t2i")
    return [full, encoded, failed, bare]


def test_every_field_comes_back_one_sample_per_row():
    sent = samples()
    block = to_block(sent)
    assert block.num_rows == len(sent)
    back = from_block(block)
    for a, b in zip(sent, back):
        assert (a.id, a.sample_index, a.task, a.prompt, a.negative_prompt, a.seed, a.sample_seed, a.width, a.height, a.covers,
                a.ordinal, a.content) == (b.id, b.sample_index, b.task, b.prompt, b.negative_prompt, b.seed, b.sample_seed, b.width,
                                          b.height, b.covers, b.ordinal, b.content)
        assert a.params == b.params and a.failure == b.failure and a.inputs == b.inputs and a.extras == b.extras
        assert a.stage_seconds == b.stage_seconds
        assert a.outputs.image == b.outputs.image and a.outputs.image_size == b.outputs.image_size and a.outputs.text == b.outputs.text
        assert a.outputs.scores == b.outputs.scores and a.outputs.embeddings.keys() == b.outputs.embeddings.keys()
        for name, value in a.outputs.embeddings.items():
            np.testing.assert_array_equal(value, b.outputs.embeddings[name])
        if a.outputs.pixels is None:
            assert b.outputs.pixels is None
        else:
            np.testing.assert_array_equal(a.outputs.pixels, b.outputs.pixels)
    np.testing.assert_array_equal(back[0].state["latent"], sent[0].state["latent"])
    assert back[0].state["latent"].dtype == np.float16
    assert back[0].params is back[1].params  # one params object restored for the block: they are immutable
    assert block.column("has_pixels").to_pylist() == [True, False, False, False]
    assert block.column("rest").null_count == 3  # nothing to pickle for an encoded, a failed or a bare sample


def test_slices_and_concatenation_keep_each_sample():
    block = to_block(samples())
    parts = [block.slice(0, 1), block.slice(1, 2), pa.table({}), block.slice(3)]  # Ray's batches, and an empty block
    joined = concat_blocks(parts)
    assert [(s.id, s.stage_seconds) for s in from_block(joined)] == [(s.id, s.stage_seconds) for s in samples()]
    assert from_block(pa.table({})) == []


def test_the_collector_is_paused_over_a_batch_and_back_after():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # an inner pause leaves the outer one in place
    assert gc.isenabled()


def test_embeddings_travel_as_float32_of_their_own_shape_through_slices():
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, 3, 4))  # float64, N-D
    made = [Sample(id=str(i), sample_index=0, task="t2i") for i in range(5)]
    made[0].outputs.embeddings = {"e": np.arange(4, dtype=np.float16), "latent": latent}
    made[2].outputs.embeddings = {"e": np.full(4, 2.5, np.float32)}
    made[3].outputs.embeddings = {"scalar": np.float32(7.0)}  # 0-D
    block = to_block(made)
    assert block.column("rest").null_count == 5  # no embedding is pickled
    for part, first in ((block, 0), (block.slice(2, 2), 2)):
        back = from_block(concat_blocks([part]))
        for got, sent in zip(back, made[first:]):
            assert got.outputs.embeddings.keys() == sent.outputs.embeddings.keys()
            for name, value in sent.outputs.embeddings.items():
                assert got.outputs.embeddings[name].dtype == np.float32
                np.testing.assert_array_equal(got.outputs.embeddings[name], np.asarray(value, np.float32))
    np.testing.assert_array_equal(from_block(block)[0].outputs.embeddings["latent"].shape, (2, 3, 4))
