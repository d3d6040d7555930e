"""GPU smoke check of the BAGEL LLM's NF4 / INT8 path (bitsandbytes), on the tiny model.

    python bench/smoke_bagel_quant.py

Runs t2i and understand rows through the family's stages on CUDA with quantize off,
nf4 and int8, and prints how far the quantised images are from the bf16 ones.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.bagel.tiny import write_tiny  # noqa: E402
from pipeline.families.bagel import FAMILY  # noqa: E402
from pipeline.family import StageContext, parse_params  # noqa: E402
from pipeline.sample import Sample  # noqa: E402

OPTIONS = {"vae_transform": [64, 32, 16], "vit_transform": [56, 28, 14], "vae_dtype": "float32"}


def rows():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    t2i, und = FAMILY.tasks["t2i"].params, FAMILY.tasks["understand"].params
    return [Sample(id="t", sample_index=0, task="t2i", prompt="a red cube on a table", sample_seed=1, width=64, height=64,
                   params=parse_params(t2i, {"num_timesteps": 8})),
            Sample(id="u", sample_index=0, task="understand", prompt="a red cube on a table", sample_seed=2,
                   inputs={"image": buf.getvalue()}, params=parse_params(und, {"max_think_token_n": 8}))]


def run(model: Path, quantize: str | None):
    out = rows()
    for spec in FAMILY.stages(str(model)):
        device = "cuda" if spec.num_gpus else "cpu"
        options = {**OPTIONS, **({"quantize": quantize} if quantize and spec.name == "lmm" else {})}
        fn = spec.build(StageContext(str(model), device, "bfloat16" if device == "cuda" else "float32", options))
        for s, r in zip(out, fn(out)):
            s.apply(r)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        model = write_tiny(Path(d) / "tiny")
        ref = run(model, None)
        print(f"# BAGEL tiny on {torch.cuda.get_device_name()}: quantised LLM vs bf16")
        for mode in ("nf4", "int8"):
            out = run(model, mode)
            a, b = out[0].outputs.pixels.astype(int), ref[0].outputs.pixels.astype(int)
            print(f"{mode}: t2i pixels {a.shape}, mean |diff| vs bf16 {np.abs(a - b).mean():.2f}, "
                  f"understand text {out[1].outputs.text!r} (bf16: {ref[1].outputs.text!r})")


if __name__ == "__main__":
    main()
