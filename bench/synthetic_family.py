"""A synthetic GPU family for measuring the runner's own overhead (bench only).

`render` spends a fixed amount of GPU work per image (bf16 matmuls) and returns a
256x256 random image drawn from the sample's seed, so the pipeline does the real
CPU work around it (PNG encoding, writing).
"""

from __future__ import annotations

import torch

from pipeline.family import Demo, Params, StageSpec, TaskSpec
from pipeline.sample import Result

SIZE = 256


def build_render(ctx):
    device = torch.device(ctx.device)
    n = int(ctx.options.get("matmuls_per_image", 50))
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def run(samples):
        x = a
        for _ in range(n * len(samples)):
            x = (x @ a).clamp_(-1, 1)
        noise = torch.stack([torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(s.sample_seed)) for s in samples])
        pixels = (noise.to(device) * 255 + x[0, 0].float() * 0).to(torch.uint8).cpu().numpy()
        return [Result(pixels=p) for p in pixels]

    return run


class NoParams(Params):
    pass


class SyntheticFamily:
    name = "synthetic"
    tasks = {"t2i": TaskSpec(NoParams)}
    scores: dict[str, str] = {}

    def stages(self, model):
        return [StageSpec("render", build_render, num_gpus=1, batch_size=32)]

    def check_model(self, model):
        pass

    def model_name(self, model):
        return "synthetic"

    def model_fingerprint(self, model):
        return "synthetic"

    def write_tiny(self, directory):
        return str(directory)

    def demo(self):
        return Demo([{"id": "s0", "prompt": "x"}], [])


FAMILY = SyntheticFamily()
