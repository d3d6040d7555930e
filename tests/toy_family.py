"""A trivial family for the runner's tests, and the smallest complete example of one:
tasks with their inputs and parameters, two stages with real work, no model weights.

`noise` draws a per-sample random image from the sample's seed (so the determinism and
resume tests check real randomness); `shade` scales it on a (declared) GPU actor and
records which GPU it ran on. Prompt words trigger failures: "explode" raises inside `shade`
for the whole batch (row isolation), "reject" makes `shade` return a RowError for that
sample alone (unless the file `options.accept_if` exists), "flaky" fails with a transient
error (storage-like) the first `options.flaky_failures` times the sample is tried:
counted per process, or across processes and runs in files under `options.flaky_dir`.
With `options.gate_dir`, a sample whose prompt is "gate-N" stops `shade` in the middle of
its batch: it writes gate_dir/at-N (holding the actor's pid) and waits for gate_dir/open-N,
so that a test can kill the actor at a known point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from pipeline.family import Demo, InputSpec, Params, StageContext, StageSpec, TaskSpec
from pipeline.inputs import decode_image
from pipeline.sample import Result, RowError

CALLS: dict[str, int] = {}  # stage -> batches seen in this process (for tests that count work)
_FLAKY_SEEN: dict[tuple[str, int], int] = {}


class ToyParams(Params):
    size: int = Field(default=16, gt=0, le=512)
    gain: float = Field(default=1.0, gt=0)


def _noise(ctx: StageContext):
    def run(samples):
        CALLS["noise"] = CALLS.get("noise", 0) + 1
        out = []
        for s in samples:
            size = s.params.size
            h, w = s.height or size, s.width or size
            g = torch.Generator().manual_seed(s.sample_seed)
            img = torch.rand(h, w, 3, generator=g)
            if s.task == "edit":
                src = np.asarray(decode_image(s.inputs["image"]).resize((w, h)), np.float32) / 255
                img = 0.5 * img + 0.5 * torch.from_numpy(src)
            out.append(Result(state=img, embeddings={"mean_color": img.mean(dim=(0, 1)).numpy()}))
        return out

    return run


def _shade(ctx: StageContext):
    if ctx.options.get("fail_build") == "value":
        raise ValueError("toy weights are malformed")  # raised inside a Ray actor: a job failure, not a user error
    if ctx.options.get("fail_build"):
        raise RuntimeError("toy weights are missing")  # a model that cannot load: the whole job fails
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    # seconds per sample; TOY_SLEEP slows one driver's run down without changing the job's settings
    delay = float(os.environ.get("TOY_SLEEP") or ctx.options.get("sleep", 0))
    flaky = int(ctx.options.get("flaky_failures", 0))
    flaky_dir = ctx.options.get("flaky_dir")
    accept_if = ctx.options.get("accept_if")
    gate_dir = ctx.options.get("gate_dir")

    def tried(key) -> int:
        """How often this sample was tried before, and count this try."""
        if flaky_dir is None:
            _FLAKY_SEEN[key] = _FLAKY_SEEN.get(key, 0) + 1
            return _FLAKY_SEEN[key] - 1
        marker = Path(flaky_dir) / f"{key[0]}.{key[1]}"
        n = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(n + 1))
        return n

    def run(samples):
        CALLS["shade"] = CALLS.get("shade", 0) + 1
        if delay:
            time.sleep(delay * len(samples))
        out: list[Result | RowError] = []
        for s in samples:
            prompt = s.prompt or ""
            if gate_dir and prompt.startswith("gate-"):
                (Path(gate_dir) / f"at-{prompt[5:]}").write_text(str(os.getpid()))
                while not (Path(gate_dir) / f"open-{prompt[5:]}").exists():
                    time.sleep(0.05)
            if "explode" in prompt:
                raise RuntimeError(f"boom on {s.id}")
            if "flaky" in prompt and tried(s.key) < flaky:
                raise ConnectionResetError(f"store dropped the connection for {s.id}")
            if "reject" in prompt and not (accept_if and Path(accept_if).exists()):
                out.append(RowError("rejected", f"{s.id} asked to be rejected"))
                continue
            pixels = (s.state * s.params.gain).clamp(0, 1).mul(255).to(torch.uint8).numpy()
            out.append(Result(pixels=pixels, scores={"gpu_id": float(visible) if visible else -1.0}))
        return out

    return run


class ToyFamily:
    name = "toy"
    tasks = {"t2i": TaskSpec(ToyParams), "edit": TaskSpec(ToyParams, inputs=(InputSpec("image"),))}
    scores = {"gpu_id": "float"}  # the GPU Ray gave the shade actor (-1: none)

    def stages(self, model):
        return [StageSpec("noise", _noise, num_gpus=0, batch_size=4, reads_inputs=True),
                StageSpec("shade", _shade, num_gpus=1, batch_size=4)]

    def check_model(self, model):
        pass  # no weights

    def model_name(self, model):
        return "toy-v1"

    def model_fingerprint(self, model):
        return "toy-v1"

    def write_tiny(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        return str(directory)

    def demo(self):
        return Demo(rows=[{"id": f"toy-{i}", "prompt": f"toy {i}", "num_samples": 1} for i in range(3)], settings=[])


FAMILY = ToyFamily()
