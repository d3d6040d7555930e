"""A trivial family for the runner's tests: real stages, no model weights.

`noise` draws a per-sample random image from the row's sample_seed (so the
determinism and resume tests check real randomness), `shade` darkens it on a
(declared) GPU actor and records where it ran. A prompt containing "explode"
raises inside `shade`, to exercise row isolation.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.family import RowError, StageContext, StageSpec

DEFAULTS = {"t2i": {"size": 16, "gain": 1.0}, "edit": {"size": 16, "gain": 1.0}}


def _noise(ctx: StageContext):
    def run(rows):
        out = []
        for r in rows:
            size = r["params"]["size"]
            h, w = r["height"] or size, r["width"] or size
            g = torch.Generator().manual_seed(r["sample_seed"])
            img = torch.rand(h, w, 3, generator=g)
            if r["task"] == "edit":
                from pipeline.inputs import load_image

                src = np.asarray(load_image(r["image"]).resize((w, h)), np.float32) / 255
                img = 0.5 * img + 0.5 * torch.from_numpy(src)
            out.append({"latent": img, "embeddings": {"mean_color": img.mean(dim=(0, 1)).numpy()}})
        return out

    return run


def _shade(ctx: StageContext):
    if ctx.options.get("fail_build"):
        raise RuntimeError("toy weights are missing")  # a model that cannot load: the whole job fails
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    delay = float(ctx.options.get("sleep", 0))

    def run(rows):
        if delay:
            import time

            time.sleep(delay * len(rows))
        out = []
        for r in rows:
            if "explode" in (r["prompt"] or ""):
                raise RuntimeError(f"boom on {r['id']}")
            pixels = (r["latent"] * r["params"]["gain"]).clamp(0, 1).mul(255).to(torch.uint8).numpy()
            out.append({"pixels": pixels, "latent": None, "extras": {**r["extras"], "gpu": visible}})
        return out

    return run


class ToyFamily:
    name = "toy"
    tasks = frozenset({"t2i", "edit"})

    def stages(self, model_path):
        return [StageSpec("noise", _noise, uses_gpu=False, default_batch_size=4),
                StageSpec("shade", _shade, uses_gpu=True, default_batch_size=4)]

    def params_for(self, task, overrides):
        params = dict(DEFAULTS[task])
        for k, v in overrides.items():
            if k not in params:
                raise RowError("bad_params", f"unknown sampler parameter {k!r} for {task}")
            if not isinstance(v, (int, float)) or v <= 0:
                raise RowError("bad_params", f"{k} must be a positive number, got {v!r}")
            params[k] = type(params[k])(v)
        return params

    def model_name(self, model_path):
        return "toy-v1"

    def model_fingerprint(self, model_path):
        return "toy-v1"


FAMILY = ToyFamily()
