"""A synthetic GPU family for measuring the runner's own overhead (bench only).

`render` spends a fixed amount of GPU work per image (bf16 matmuls) and returns a
256x256 random image drawn from the sample's seed, so the pipeline does the real
CPU work around it (PNG encoding, writing).
"""

from __future__ import annotations

import torch

from pipeline.family import RowError, StageSpec

SIZE = 256


def build_render(ctx):
    device = torch.device(ctx.device)
    n = int(ctx.options.get("matmuls_per_image", 50))
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)

    def run(rows):
        x = a
        for _ in range(n * len(rows)):
            x = (x @ a).clamp_(-1, 1)
        noise = torch.stack([torch.rand(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(r["sample_seed"])) for r in rows])
        pixels = (noise.to(device) * 255 + x[0, 0].float() * 0).to(torch.uint8).cpu().numpy()
        return [{"pixels": p} for p in pixels]

    return run


class SyntheticFamily:
    name = "synthetic"
    tasks = frozenset({"t2i"})

    def stages(self, model_path):
        return [StageSpec("render", build_render, uses_gpu=True, default_batch_size=32)]

    def params_for(self, task, overrides):
        if overrides:
            raise RowError("bad_params", f"synthetic takes no parameters, got {sorted(overrides)}")
        return {}

    def model_name(self, model_path):
        return "synthetic"

    def model_fingerprint(self, model_path):
        return "synthetic"


FAMILY = SyntheticFamily()
